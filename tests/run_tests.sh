#!/usr/bin/env bash
# The test command of the README: install the pinned dependencies, then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-test.txt -e .
python3 -m pytest -q -p no:cacheprovider tests "$@"
