#!/usr/bin/env python3
"""Restore transformers' own common model tests (`tests/*.py` of its release sdist) for megahf's test suite.

    python scripts/fetch_transformers_tests.py          # once; scripts/setup_env.sh calls it
    python scripts/fetch_transformers_tests.py --check  # exit 1 (with the fix) when they are not restored

The transformers release pinned in scripts/requirements-test.txt ships its `ModelTesterMixin`
(tests/test_modeling_common.py), `TrainingTesterMixin` (tests/test_training_mixin.py),
`TensorParallelTesterMixin` (tests/test_tensor_parallel_mixin.py) and `ConfigTester`
(tests/test_configuration_common.py) in its sdist. They are not copied into this repository: this script downloads
the sdist from PyPI with pip (`pip download --no-deps --no-binary :all:`), checks it against the sha256 pinned
below, and extracts its top-level `tests/*.py` into `.venv/transformers-tests/transformers-<version>/tests/`
(ignored by git), with an empty `__init__.py` (the sdist has none). tests/hf_common/ imports them from there. A marker file holding the sha256 makes later runs a
no-op. Set MEGAHF_TRANSFORMERS_TESTS to put the cache elsewhere (tests/hf_common reads the same variable).

Bumping transformers: change TRANSFORMERS_VERSION and TRANSFORMERS_SDIST_SHA256 together (the hash is printed by
`pip download --no-deps --no-binary :all: transformers==X -d /tmp/x && sha256sum /tmp/x/*`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TRANSFORMERS_VERSION = "5.24.0"
TRANSFORMERS_SDIST_SHA256 = "906cb8c3cb2123575e263962586a4d21a979ce97feeb95fe6aaf66fe6ae88bf3"

ROOT = Path(__file__).resolve().parent.parent
MARKER = ".megahf-sdist-sha256"


def cache_root() -> Path:
    return Path(os.environ.get("MEGAHF_TRANSFORMERS_TESTS") or ROOT / ".venv" / "transformers-tests")


def tests_dir() -> Path:
    """The folder that holds the restored `test_modeling_common.py` and its siblings."""
    return cache_root() / f"transformers-{TRANSFORMERS_VERSION}" / "tests"


def is_restored() -> bool:
    marker = tests_dir().parent / MARKER
    return marker.is_file() and marker.read_text().strip() == TRANSFORMERS_SDIST_SHA256


def _say(message: str) -> None:
    print(f"[fetch_transformers_tests] {message}", file=sys.stderr)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(staging: Path, target: Path, sha256: str) -> None:
    """Put the extracted `staging` folder at `target`, with the marker that says which sdist it came from."""
    (staging / MARKER).write_text(sha256 + "\n")
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(target))


def fetch() -> None:
    target = tests_dir().parent
    with tempfile.TemporaryDirectory() as tmp:
        # --no-build-isolation: pip must not build anything to list the sdist (no build backend is downloaded)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--no-build-isolation", f"transformers=={TRANSFORMERS_VERSION}", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("transformers-*.tar.gz"))
        if not sdists:
            detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise SystemExit(
                f"error: could not download the transformers=={TRANSFORMERS_VERSION} sdist from PyPI "
                f"(offline, or PyPI unreachable?).\n  command: {' '.join(cmd)}\n  " + "\n  ".join(detail) +
                "\n  The common model tests in tests/hf_common need it: run this script (or "
                "`bash scripts/setup_env.sh`) once with access to PyPI.")
        sdist = sdists[0]
        digest = sha256_of(sdist)
        if digest != TRANSFORMERS_SDIST_SHA256:
            raise SystemExit(f"error: {sdist.name} has sha256 {digest}, expected {TRANSFORMERS_SDIST_SHA256} "
                             "(pinned in scripts/fetch_transformers_tests.py); refusing to use it.")
        prefix = f"transformers-{TRANSFORMERS_VERSION}/tests/"
        staging = Path(tmp) / "staging"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".py")
                       and "/" not in m.name[len(prefix):]]
            if not any(m.name.endswith("/test_modeling_common.py") for m in members):
                raise SystemExit(f"error: {sdist.name} has no {prefix}test_modeling_common.py")
            for member in members:
                out = staging / "tests" / Path(member.name).name
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        # The sdist has no tests/__init__.py; test_configuration_common.py imports its folder as a package.
        (staging / "tests" / "__init__.py").touch()
        publish(staging, target, TRANSFORMERS_SDIST_SHA256)
    _say(f"restored {len(members)} files of transformers {TRANSFORMERS_VERSION}'s tests/ into {tests_dir()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when not restored")
    args = parser.parse_args()
    if is_restored():
        _say(f"transformers {TRANSFORMERS_VERSION} tests already restored at {tests_dir()}")
        return 0
    if args.check:
        _say(f"transformers {TRANSFORMERS_VERSION} tests are not restored at {tests_dir()}; "
             "run: python scripts/fetch_transformers_tests.py")
        return 1
    fetch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
