#!/usr/bin/env bash
# Run megahf's test suite in the pinned environment (.venv, offline).
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k tokenizer -vv
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
# transformers' common model tests (tests/hf_common) come from its sdist: restore them or stop here with the reason
python scripts/fetch_transformers_tests.py
python -m pytest tests -q -x --timeout=900 "$@"
