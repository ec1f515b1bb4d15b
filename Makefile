# Two commands: `make run` serves the proxy on 127.0.0.1:8000; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
export DATABASE_URL_TEST ?= postgres://postgres@127.0.0.1:5432/oauthproxy

.PHONY: run test install lint e2e-deps bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,e2e]"
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

run: install
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
