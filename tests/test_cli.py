"""`megahf <verb>` and `python -m megahf <verb>`: help, and bad recipes refused with one line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megahf.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_python_m_megahf_refuses_a_bad_recipe_with_one_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: gpt-tiny\nlerning_rate: 1.0e-3\n")
    proc = subprocess.run([sys.executable, "-m", "megahf", "pretrain", str(recipe), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("megahf pretrain: error: unknown recipe key 'lerning_rate'")
    assert "did you mean 'learning_rate'?" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "o").exists()  # nothing written


def test_console_script_help():
    script = Path(sys.executable).with_name("megahf")
    assert script.exists(), "the megahf console script is not installed next to this interpreter (pip install -e .)"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pretrain" in proc.stdout and "usage: megahf" in proc.stdout


def test_pretrain_help_lists_every_recipe_key(capsys):
    from megahf.recipe import PretrainRecipe, recipe_keys

    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "megahf pretrain [-h] RECIPE [--key value ...]" in out
    for key in recipe_keys(PretrainRecipe):
        assert f"--{key} (default:" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train_steps", "ten"], "recipe key 'train_steps' on the command line (--train_steps) must be an integer"),
        (["--model", "gpt-tiy"], "did you mean 'gpt-tiny'?"),
        (["positional"], "unexpected command-line argument 'positional'"),
    ],
)
def test_bad_overrides_exit_2(args, message, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train_steps: 10\nwarmup_steps: 1\n")
    assert main(["pretrain", str(recipe), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_missing_recipe_file_exits_2(capsys, tmp_path):
    assert main(["pretrain", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file" in capsys.readouterr().err


def test_no_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_preprocess_verb_writes_an_indexed_dataset(tmp_path):
    from megahf.cli import main
    from megahf.data import IndexedDataset

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "Hello world"}\n{"text": " Hello world"}\n')
    prefix = tmp_path / "out" / "my"
    assert main(["preprocess", "--input", str(corpus), "--tokenizer", "gpt2", "--output-prefix", str(prefix),
                 "--append-eod", "--workers", "1"]) == 0
    dataset = IndexedDataset(f"{prefix}_text_document")
    assert [list(dataset[i]) for i in range(len(dataset))] == [[15496, 995, 50256], [18435, 995, 50256]]


def test_preprocess_verb_rejects_unknown_options(capsys, tmp_path):
    from megahf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", "--input", "x.jsonl", "--tokenizer", "gpt2", "--output-prefix", str(tmp_path / "p"),
              "--bogus"])
    assert exit_info.value.code == 2
    assert "--bogus" in capsys.readouterr().err
