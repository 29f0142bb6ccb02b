#!/usr/bin/env bash
# Run megahf's whole test suite in the pinned environment (.venv, offline) and report every failure.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -x   (stop at the first failure)
#                                     bash scripts/test.sh -k tokenizer -vv
#                                     MEGAHF_TEST_WORKERS=0 bash scripts/test.sh tests/test_cli.py  (one process)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
# what the tests compare against must be here: transformers' common model tests (from its sdist) and the plays the
# shipped corpus was built from; each script stops here with the reason when it cannot restore them
python scripts/fetch_transformers_tests.py
python scripts/fetch_shakespeare.py
# in this environment a missing oracle (megatron-core, lm-eval, nanotron) fails its tests instead of skipping them
export MEGAHF_REQUIRE_ORACLES=1
# Two pytest processes, a test file each at a time (module fixtures are built once): the in-process tests run on one
# thread (tests/conftest.py), so a single pytest process would leave the second core of a 2-core machine idle.
# MEGAHF_TEST_WORKERS=0 runs everything in this process.
python -m pytest tests -q --timeout=900 -n "${MEGAHF_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
