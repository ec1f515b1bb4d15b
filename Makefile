# Two commands: `make run` serves the proxy on 127.0.0.1:8000; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
# `make run` serves at http://127.0.0.1:$(PORT) and tells clients so, unless PUBLIC_BASE_URL says otherwise.
RUN_PUBLIC_BASE_URL := $(or $(PUBLIC_BASE_URL),http://127.0.0.1:$(PORT))
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

run: export DJANGO_SETTINGS_MODULE := proxy_site.settings.local
run: export PUBLIC_BASE_URL := $(RUN_PUBLIC_BASE_URL)
run: install-run
	$(PY) manage.py migrate --noinput
	$(PY) manage.py ensure_admin
	@echo "Serving on http://127.0.0.1:$(PORT)/admin/ (PUBLIC_BASE_URL=$(RUN_PUBLIC_BASE_URL))"
	$(VENV)/bin/uvicorn proxy_site.asgi:application --host 127.0.0.1 --port $(PORT)

e2e-deps:
	if [ -f tests/e2e/install.sh ]; then bash tests/e2e/install.sh; fi

# The whole suite on PostgreSQL, then on SQLite (`make run`'s database) every test that does not need
# PostgreSQL's concurrency (marker `postgres`), with the end-to-end test of `make run` itself (once: there).
test: install e2e-deps
	DATABASE_URL=$${DATABASE_URL:-$(DATABASE_URL_TEST)} $(PY) -m pytest --ignore=tests/e2e/test_make_run.py
	DATABASE_URL=sqlite:// $(PY) -m pytest -m "not postgres"

bench: install e2e-deps
	bash bench/install-fastmcp.sh
	$(PY) -m bench --quick --snapshot

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) db.sqlite3 var
