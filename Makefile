# Two commands: `make run` serves the proxy on 127.0.0.1:8000; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
HASH := $(shell cat pyproject.toml | sha1sum | cut -c1-12)
# Two install levels: what serving needs (`make run`), and the test, lint and end-to-end tools on top.
RUN_STAMP := $(VENV)/.installed-run-$(HASH)
STAMP := $(VENV)/.installed-$(HASH)
export DATABASE_URL_TEST ?= postgres://postgres@127.0.0.1:5432/oauthproxy

.PHONY: run test install install-run lint e2e-deps bench clean

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	rm -f $(VENV)/.installed-*; touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,e2e]"
	touch $(STAMP)

install-run: $(RUN_STAMP)

install: $(STAMP)

run: install-run
	DJANGO_SETTINGS_MODULE=proxy_site.settings.local $(PY) manage.py migrate --noinput
	DJANGO_SETTINGS_MODULE=proxy_site.settings.local $(PY) manage.py ensure_admin
	@echo "Serving on http://127.0.0.1:$(PORT)/admin/"
	DJANGO_SETTINGS_MODULE=proxy_site.settings.local $(VENV)/bin/uvicorn proxy_site.asgi:application \
		--host 127.0.0.1 --port $(PORT)

e2e-deps:
	if [ -f tests/e2e/install.sh ]; then bash tests/e2e/install.sh; fi

test: install e2e-deps
	DATABASE_URL=$${DATABASE_URL:-$(DATABASE_URL_TEST)} $(PY) -m pytest

bench: install e2e-deps
	bash bench/install-fastmcp.sh
	$(PY) -m bench --quick --snapshot

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) db.sqlite3 var
