#!/usr/bin/env bash
# Fresh machine to a streamed answer: set up, fetch + verify + import the default model, ask it something.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/llmosctl model import --default
.venv/bin/llmosctl generate "${1:-Write a Python function that returns the square of a number.}"
