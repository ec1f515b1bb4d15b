#!/usr/bin/env bash
# FastMCP (the comparison) and py-spy (the profiler) in their own virtualenv: FastMCP pins its own mcp version,
# which must not touch the project's. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-fastmcp"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet "fastmcp==4.2.3" "uvicorn[standard]" "py-spy==0.4.3"
"$venv/bin/python" -c "import fastmcp; print('fastmcp', fastmcp.__version__)"
