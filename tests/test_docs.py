"""The documentation: README.md and docs/ (built by mkdocs, mkdocs.yml at the repository root).

Three checks, each a rule simple enough to state here.

1. The site builds: `mkdocs build --strict` (any warning fails: a broken link or anchor, a page missing from the nav),
   and every relative link of README.md names a file that exists.

2. Every example runs, or says why it cannot. A fenced block whose language is `bash` or `python` is executed, in
   the order of its page, in a fresh folder per page that holds links to the repository's `recipes/`, `src/`,
   `scripts/`, `setup.cfg` and `.venv/`, and `runs/gpt-tiny/final`: a randomly initialised `gpt-tiny` with the
   shipped GPT-2 tokenizer, standing in for what `bash scripts/demo.sh` writes. A bash block runs line by line
   (a trailing `\\` continues a line; `#` starts a comment): a line that starts with `megahf` or `python -m megahf`
   runs `megahf.cli.main` in this process (no second import of torch), any other line runs in bash; each must
   exit 0. A python block runs with `exec` in this process. The HTML comment on the line before a block (mkdocs
   and GitHub show nothing of it) changes that:
     <!-- extended -->             run only in the extended tier (MEGAHF_EXTENDED_TESTS=1): torchrun, longer runs
     <!-- torchrun: N -->          a python block written to a file and run by `torchrun --nproc_per_node N`
                                   (extended tier)
     <!-- needs: gpu -->           not run here: it needs one or more GPUs
     <!-- needs: nodes -->         not run here: it needs several nodes (a cluster)
     <!-- needs: network -->       not run here: it reaches huggingface.co (a Hub dataset, a push); the offline
                                   stand-in of the same path is the test named in the same paragraph
     <!-- benchmark: PATH -->      not run here: a benchmark (minutes); PATH, its committed output, must exist
     <!-- run-by: TEST -->         not run here: TEST (a test id, or .ci/run) runs exactly this command
   Blocks in other languages (`text` for a console transcript, `yaml`, `json`) are not run; a fence without a
   language is refused, so nothing escapes by accident.

3. Every claim points at its proof. The text is cut into units: a paragraph (lines up to a blank line), a list
   item (a line starting with `- ` or `* ` and its indented continuation) and a table row; code blocks, inline
   code and link targets are read only as citations. A citation is a test id (`tests/PATH.py` or
   `tests/PATH.py::NAME`: the file exists and `def NAME`/`class NAME` is in it) or a results file
   (`scripts/bench/results/NAME`, which exists).
     - A unit that says `tested` (also `parity-tested`) must cite a test id.
     - A unit that states a figure must cite a test id or a results file. A figure is a number with a unit:
       `%`, a ratio `1.20x`, `tokens/s`, `passages/s`, `TFLOP/s`, `MFU`, `s`/`ms` (seconds), `GiB`, `MiB`,
       `GB`, `MB`, `GB/s`, `MiB/s`. A table row may lean on the paragraph just before its table (the caption).
   Every citation anywhere must exist, whether a rule asks for it or not.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
EXTENDED = os.environ.get("MEGAHF_EXTENDED_TESTS") == "1"
RUN_LANGS = {"bash", "python"}
INERT_LANGS = {"text", "yaml", "json"}
SKIP_MARKERS = {"needs: gpu", "needs: nodes", "needs: network"}


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------------- reading the markdown
@dataclass
class Block:
    path: Path
    line: int        # 1-based line of the opening fence
    lang: str
    marker: str      # the HTML comment before the fence, without <!-- -->, or ""
    code: str

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"


FENCE = re.compile(r"^(\s*)```(.*)$")
MARKER = re.compile(r"^\s*<!--\s*(.*?)\s*-->\s*$")


def split_markdown(path: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks of a file, and its other lines (line number, text) with every fenced line blanked."""
    lines = path.read_text().splitlines()
    blocks, prose = [], []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        indent, lang = match.group(1), match.group(2).strip()
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        marker = ""
        j = start - 1
        if j >= 0 and MARKER.match(lines[j]):
            marker = MARKER.match(lines[j]).group(1)
        blocks.append(Block(path, start + 1, lang, marker, "\n".join(body) + "\n"))
        prose.append((start + 1, ""))
    return blocks, prose


def all_blocks() -> list[Block]:
    return [block for path in doc_files() for block in split_markdown(path)[0]]


# ---------------------------------------------------------------------- citations
TEST_ID = re.compile(r"(?<![\w/.])(tests/[\w/]+\.py)(?:::(\w+))?")
RESULT = re.compile(r"(?<![\w/.])(scripts/bench/results/[\w.\-]+)")


def _test_id_exists(path: str, name: str | None) -> bool:
    file = REPO / path
    if not file.is_file():
        return False
    return name is None or re.search(rf"^\s*(def|class) {re.escape(name)}\b", file.read_text(), re.M) is not None


def citations(text: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    return TEST_ID.findall(text), RESULT.findall(text)


def missing_citations(text: str) -> list[str]:
    tests, results = citations(text)
    bad = [f"{p}::{n}" if n else p for p, n in tests if not _test_id_exists(p, n or None)]
    bad += [r for r in results if not (REPO / r).is_file()]
    return bad


# ---------------------------------------------------------------------- claims
UNITS_OF_FIGURES = r"(?:%|x\b|\s?tokens/s|\s?passages/s|\s?TFLOP/s|\s?GB/s|\s?MiB/s|\s(?:s|ms|GiB|MiB|GB|MB)\b|\s?MFU)"
FIGURE = re.compile(r"(?<![\w.\-=/])\d[\d,]*(?:\.\d+)?" + UNITS_OF_FIGURES)
TESTED = re.compile(r"\b(?:parity-)?tested\b", re.I)
INLINE_CODE = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")


@dataclass
class Unit:
    path: Path
    line: int
    text: str
    caption: str = ""   # for a table row: the paragraph before its table

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def units(path: Path) -> list[Unit]:
    _, prose = split_markdown(path)
    out: list[Unit] = []
    current: Unit | None = None
    last_paragraph = ""
    in_table = False
    for number, line in prose:
        stripped = line.strip()
        if not stripped or MARKER.match(line):
            if current is not None and not in_table:
                last_paragraph = current.text
            current, in_table = None, False
            continue
        if stripped.startswith("|"):
            if not in_table and current is not None:
                last_paragraph = current.text
            in_table = True
            if not re.fullmatch(r"[|\s:\-]+", stripped):
                out.append(Unit(path, number, stripped, caption=last_paragraph))
            current = None
            continue
        if in_table:
            in_table = False
        starts_item = re.match(r"^\s{0,3}([-*]|\d+\.)\s", line) is not None
        if stripped.startswith("#"):   # a heading names a topic; it claims nothing
            if current is not None:
                last_paragraph = current.text
            current = None
            continue
        if current is None or starts_item:
            if current is not None:
                last_paragraph = current.text
            current = Unit(path, number, stripped)
            out.append(current)
        else:
            current.text += " " + stripped
    return out


def claim_text(text: str) -> str:
    """What a unit says, without its inline code and link targets (those are read as citations only)."""
    return INLINE_CODE.sub(" ", LINK_TARGET.sub("]", text))


def claim_problems(unit: Unit) -> list[str]:
    problems = [f"{unit.where}: cites {c}, which does not exist" for c in missing_citations(unit.text)]
    said = claim_text(unit.text)
    tests, results = citations(unit.text)
    cap_tests, cap_results = citations(unit.caption)
    if TESTED.search(said) and not tests:
        problems.append(f"{unit.where}: says 'tested' without a test id: {unit.text[:160]}")
    figures = FIGURE.findall(said)
    if figures and not (tests or results or cap_tests or cap_results):
        problems.append(f"{unit.where}: figures {figures[:4]} without a test id or results file: {unit.text[:160]}")
    return problems


def test_every_claim_cites_an_existing_test_or_result():
    problems = [p for path in doc_files() for unit in units(path) for p in claim_problems(unit)]
    assert problems == [], "\n".join(problems)


def test_the_claim_rule_catches_what_it_should():
    def check(text: str) -> list[str]:
        return claim_problems(Unit(REPO / "README.md", 1, text))

    assert check("Parity-tested at TP=2.")
    assert check("Parity-tested at TP=2 (`tests/nope.py`).")
    assert not check("Tested: `tests/test_plan.py::test_the_papers_tensor_parallel_degree_comes_first`.")
    assert check("Tested (`tests/test_plan.py::test_no_such_test`).")
    assert check("It runs at 3,151 tokens/s, MFU 37.1%.")
    assert check("1.20x faster")
    assert check("53 s for the run")
    assert not check("1.20x faster (`scripts/bench/results/pretrain_cpu_variants.txt`)")
    assert check("1.20x faster (`scripts/bench/results/no_such_file.txt`)")
    assert not check("gpt-345m at TP=2 x FSDP2=2, hidden 512, 6 layers, lr 1.5e-4, the `loss_chunk_size: 1024` key")
    assert not check("untested on GPUs")
    row = Unit(REPO / "README.md", 1, "| a | 2,095 | 54.1% |",
               caption="Output in `scripts/bench/results/pretrain_cpu_variants.txt`:")
    assert claim_problems(row) == []


# ---------------------------------------------------------------------- the site
def test_mkdocs_builds_strict_without_warnings(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    command = [str(mkdocs)] if mkdocs.exists() else [sys.executable, "-m", "mkdocs"]
    proc = subprocess.run([*command, "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav():
    import yaml

    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def pages(nav):
        for entry in nav:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from pages(value) if isinstance(value, list) else [value]

    assert sorted(pages(config["nav"])) == sorted(p.name for p in DOCS.glob("*.md"))


def test_readme_links_exist_and_readme_is_short():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 250
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (REPO / target).exists(), f"README.md links to {target}, which does not exist"
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text


# ---------------------------------------------------------------------- the examples
def test_every_example_runs_or_is_marked():
    problems = []
    for block in all_blocks():
        if not block.lang:
            problems.append(f"{block.where}: a fence without a language (bash, python, text, yaml, json)")
        elif block.lang not in RUN_LANGS | INERT_LANGS:
            problems.append(f"{block.where}: language {block.lang!r}: use one of {sorted(RUN_LANGS | INERT_LANGS)}")
        elif block.lang in INERT_LANGS and block.marker:
            problems.append(f"{block.where}: a marker on a {block.lang} block, which is never run")
        elif block.marker:
            problems += [f"{block.where}: {p}" for p in marker_problems(block)]
    assert problems == [], "\n".join(problems)


def marker_problems(block: Block) -> list[str]:
    marker = block.marker
    if marker in SKIP_MARKERS or marker == "extended":
        return []
    if marker.startswith("torchrun:"):
        ok = block.lang == "python" and marker.split(":", 1)[1].strip().isdigit()
        return [] if ok else [f"'{marker}' needs a python block and a process count"]
    if marker.startswith("benchmark:"):
        path = marker.split(":", 1)[1].strip()
        ok = path.startswith("scripts/bench/results/") and (REPO / path).is_file()
        return [] if ok else [f"'{marker}': no committed output at {path}"]
    if marker.startswith("run-by:"):
        target = marker.split(":", 1)[1].strip()
        if target == ".ci/run":
            runs = (REPO / ".ci/run").is_file() and all(
                line.strip() in (REPO / ".ci/run").read_text() for line in block.code.splitlines()
                if line.strip() and not line.strip().startswith("#"))
            return [] if runs else [f"'{marker}': .ci/run does not run {block.code.strip()!r}"]
        match = TEST_ID.fullmatch(target)
        ok = match is not None and _test_id_exists(match.group(1), match.group(2))
        return [] if ok else [f"'{marker}': no such test"]
    return [f"unknown marker '{marker}'"]


def runs_in(block: Block, extended: bool) -> bool:
    if block.lang not in RUN_LANGS:
        return False
    if block.marker == "":
        return True
    if block.marker == "extended" or block.marker.startswith("torchrun:"):
        return extended
    return False


def pages_with_examples() -> list[Path]:
    return [path for path in doc_files() if any(runs_in(b, True) for b in split_markdown(path)[0])]


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """A randomly initialised gpt-tiny with the shipped tokenizer, where the demo writes its model."""
    import torch

    from megahf import MegatronGPTConfig, MegatronGPTForCausalLM
    from megahf.assets import load_gpt2_tokenizer

    folder = tmp_path_factory.mktemp("gpt-tiny") / "final"
    torch.manual_seed(0)
    MegatronGPTForCausalLM(MegatronGPTConfig.from_preset("gpt-tiny")).save_pretrained(folder)
    load_gpt2_tokenizer().save_pretrained(folder)
    return folder


def logical_lines(code: str) -> list[str]:
    joined, out = "", []
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        joined += line
        words = shlex.split(joined, comments=True)
        if words:
            out.append(joined)
        joined = ""
    return out


def run_bash_line(line: str, cwd: Path, env: dict) -> str | None:
    """Run one line of a bash example; None when it succeeded, else what went wrong."""
    words = shlex.split(line, comments=True)
    inprocess = None
    if words[0] == "megahf":
        inprocess = words[1:]
    elif words[:3] == ["python", "-m", "megahf"]:
        inprocess = words[3:]
    if inprocess is not None and not any(w in {"|", ">", "&&", ";"} for w in words):
        import torch

        from megahf.cli import main

        threads = torch.get_num_threads()
        try:
            code = main(inprocess)
        except SystemExit as stop:   # argparse: --help exits 0
            code = stop.code or 0
        finally:
            torch.set_num_threads(threads)
        return None if code == 0 else f"exit status {code}"
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    return None if proc.returncode == 0 else f"exit status {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"


@pytest.mark.parametrize("page", pages_with_examples(), ids=rel)
def test_examples_of_page_run(page, tiny_model_folder, tmp_path, monkeypatch):
    blocks = [b for b in split_markdown(page)[0] if runs_in(b, EXTENDED)]
    if not blocks:
        pytest.skip("this page's examples run in the extended tier: MEGAHF_EXTENDED_TESTS=1 bash scripts/test.sh")
    for name in ("recipes", "src", "scripts", "setup.cfg", ".venv", "tests"):
        if (REPO / name).exists():
            (tmp_path / name).symlink_to(REPO / name)
    shutil.copytree(tiny_model_folder, tmp_path / "runs" / "gpt-tiny" / "final")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        if block.marker.startswith("torchrun:"):
            script = tmp_path / f"example_{block.line}.py"
            script.write_text(block.code)
            count = block.marker.split(":", 1)[1].strip()
            error = run_bash_line(f"torchrun --nproc_per_node {count} {script.name}", tmp_path, env)
            assert error is None, f"{block.where}: {error}"
        elif block.lang == "python":
            try:
                exec(compile(block.code, block.where, "exec"), {"__name__": "__main__"})
            except Exception as error:  # noqa: BLE001: report which block failed
                raise AssertionError(f"{block.where}: {type(error).__name__}: {error}") from error
        else:
            for line in logical_lines(block.code):
                error = run_bash_line(line, tmp_path, env)
                assert error is None, f"{block.where}: `{line.strip()}`: {error}"
