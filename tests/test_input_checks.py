"""Bad input fails early with a message naming the key or file, the value and the fix; the command line reports
every megahf error as one line (`megahf VERB: error: ...`, exit status 2) and leaves nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from megahf.cli import main
from megahf.errors import MegahfError, OutputWriteError, explain_write_errors
from megahf.recipe import PretrainRecipe, RecipeError, parse_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def locked_folder(path: Path) -> Path:
    """A folder made read-only with chmod 0o500; the test is skipped where that does not stop writes (root, or a
    process with CAP_DAC_OVERRIDE), with the reason."""
    path.mkdir()
    path.chmod(0o500)
    try:
        (path / "probe").write_text("")
    except PermissionError:
        return path
    (path / "probe").unlink()
    path.chmod(0o700)
    pytest.skip("chmod 0o500 does not stop this process from writing (root); the simulated test covers the error")
WORDS = "the king and queen of the castle speak to the lords in the hall while night falls".split()


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def one_error_line(err: str, verb: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"megahf {verb}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- optimizer and schedule numbers


@pytest.mark.parametrize("key,value,rule", [
    ("adam_eps", "inf", "finite number, e.g. 1e-08"),
    ("adam_eps", "nan", "finite number"),
    ("adam_eps", "0", "strictly between 0 and 1, e.g. 1e-8"),
    ("adam_eps", "2", "strictly between 0 and 1"),
    ("weight_decay", "inf", "finite number, e.g. 0.1"),
    ("weight_decay", "-0.1", r"0 \(off\) or positive"),
    ("adam_beta1", "1", r"lie in \[0, 1\)"),
    ("adam_beta2", "nan", "finite number, e.g. 0.95"),
    ("adam_beta2", "-0.5", r"lie in \[0, 1\)"),
    ("clip_grad", "inf", "finite number, e.g. 1.0"),
    ("clip_grad", "-1", r"0 \(off\) or positive"),
    ("learning_rate", "inf", "finite number, e.g. 0.001"),
    ("learning_rate", "0", "positive"),
    ("min_learning_rate", "nan", "finite number"),
    ("min_learning_rate", "-inf", "finite number"),
    ("mask_prob", "inf", "finite number, e.g. 0.15"),
    ("valid_fraction", "nan", "finite number"),
    ("peak_tflops", "inf", "finite number"),
])
def test_every_number_is_finite_and_in_range(key, value, rule):
    with pytest.raises(RecipeError, match=rf"recipe key {key}=\S+ is invalid: it must .*{rule}"):
        parse_recipe(PretrainRecipe, None, [f"--{key}", value])


def test_adam_eps_inf_is_refused_by_the_cli_before_anything_is_written(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: gpt-tiny\ntrain_steps: 4\nwarmup_steps: 1\n")
    assert main(["pretrain", str(recipe), "--adam_eps", "inf", "--output_dir", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err, "pretrain")
    assert "adam_eps=inf" in line and "e.g." in line
    assert not (tmp_path / "out").exists()


def test_sensible_values_still_pass():
    recipe = parse_recipe(PretrainRecipe, None, ["--adam_eps", "1e-6", "--adam_beta2", "0.999", "--weight_decay", "0",
                                                 "--clip_grad", "0", "--min_learning_rate", "0"])
    assert recipe.optim.adam_eps == 1e-6 and recipe.optim.clip_grad == 0.0


# ----------------------------------------------------------------------------- output_dir


def test_output_dir_naming_a_file_is_refused_at_the_recipe_check(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder\n")
    with pytest.raises(RecipeError, match=r"output_dir='.*taken' names an existing file, not a folder; name a "
                                          r"folder"):
        parse_recipe(PretrainRecipe, None, ["--output_dir", str(a_file)])
    with pytest.raises(RecipeError, match=r"output_dir='.*taken/run' cannot be created: .*taken is a file"):
        parse_recipe(PretrainRecipe, None, ["--output_dir", str(a_file / "run")])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: gpt-tiny\n")
    assert main(["pretrain", str(recipe), "--output_dir", str(a_file)]) == 2
    assert "output_dir=" in one_error_line(capsys.readouterr().err, "pretrain")
    assert a_file.read_text() == "not a folder\n"


def test_output_dir_in_a_read_only_folder_is_refused_at_the_recipe_check(tmp_path):
    locked = locked_folder(tmp_path / "locked")
    try:
        with pytest.raises(RecipeError, match=r"output_dir='.*locked/run' cannot be written: .*locked is not "
                                              r"writable"):
            parse_recipe(PretrainRecipe, None, ["--output_dir", str(locked / "run")])
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------- dataset files under `megahf pretrain`


def write_corpus(path: Path, n_docs: int, seed: int) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    """Two `megahf preprocess` outputs of different sizes: d_text_document and other_text_document."""
    from megahf.data.preprocess import preprocess_corpus

    root = tmp_path_factory.mktemp("indexed")
    for name, n_docs in (("d", 60), ("other", 45)):
        preprocess_corpus(str(write_corpus(root / f"{name}.jsonl", n_docs, seed=n_docs)), str(root / name),
                          tokenizer="gpt2", append_eod=True)
    return root


def _shift_middle_pointers(data: bytearray) -> bytearray:
    n, _ = struct.unpack_from("<QQ", bytes(data), 18)
    for i in range(1, n - 1):
        at = 34 + 4 * n + 8 * i
        data[at : at + 8] = struct.pack("<q", struct.unpack_from("<q", bytes(data), at)[0] + 2)
    return data


BROKEN = {
    "truncated-bin": (".bin", lambda d, other: d[:-7], r"d_text_document\.bin: data file is .* truncated"),
    "bad-magic": (".idx", lambda d, other: b"NOTMEGA!!" + d[9:], r"d_text_document\.idx: not a Megatron index"),
    "truncated-idx": (".idx", lambda d, other: d[:-5], r"d_text_document\.idx: truncated index file"),
    "other-dataset": (".bin", lambda d, other: other, r"d_text_document\.bin: .* different datasets"),
    "middle-pointers": (".idx", lambda d, other: _shift_middle_pointers(bytearray(d)),
                        r"d_text_document\.idx: corrupt index: 58 of 60 sequence pointers"),
}


def break_dataset(datasets_dir: Path, tmp_path: Path, case: str) -> str:
    suffix, damage, _ = BROKEN[case]
    prefix = tmp_path / "d_text_document"
    for ext in (".bin", ".idx"):
        (tmp_path / f"d_text_document{ext}").write_bytes((datasets_dir / f"d_text_document{ext}").read_bytes())
    other = (datasets_dir / f"other_text_document{suffix}").read_bytes()
    target = tmp_path / f"d_text_document{suffix}"
    target.write_bytes(bytes(damage(target.read_bytes(), other)))
    return str(prefix)


def tiny_pretrain_args(tmp_path: Path, data_path: str) -> list[str]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: gpt-tiny\n")
    return ["pretrain", str(recipe), "--data_path", data_path, "--output_dir", str(tmp_path / "out"),
            "--data_cache_path", str(tmp_path / "cache"), "--model_overrides.num_layers", "1",
            "--model_overrides.hidden_size", "32", "--seq_length", "16", "--micro_batch_size", "2",
            "--train_steps", "2", "--warmup_steps", "0", "--sample_tokens", "0", "--split", "90,10,0"]


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_damaged_dataset_under_pretrain_is_one_error_line(datasets_dir, tmp_path, case, capsys):
    prefix = break_dataset(datasets_dir, tmp_path, case)
    assert main(tiny_pretrain_args(tmp_path, prefix)) == 2
    line = one_error_line(capsys.readouterr().err, "pretrain")
    assert __import__("re").search(BROKEN[case][2], line), line
    assert not (tmp_path / "out").exists()  # nothing written: no final/, no metrics


def test_damaged_dataset_through_the_console_entry_point(datasets_dir, tmp_path):
    prefix = break_dataset(datasets_dir, tmp_path, "middle-pointers")
    proc = subprocess.run([sys.executable, "-m", "megahf", *tiny_pretrain_args(tmp_path, prefix)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("megahf pretrain: error: ")]
    assert len(line) == 1 and "d_text_document.idx" in line[0] and "megahf preprocess" in line[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- full disk, unwritable folder


def test_explain_write_errors_translates_only_disk_and_permission_errors(tmp_path):
    for code, words in ((errno.ENOSPC, "the disk is full"), (errno.EACCES, "the folder is not writable"),
                        (errno.EROFS, "the file system is read-only"), (errno.EDQUOT, "the disk quota")):
        with pytest.raises(OutputWriteError) as e:
            with explain_write_errors(tmp_path / "out", intact="the previous out is intact"):
                raise OSError(code, os.strerror(code), str(tmp_path / ".out.partial"))
        message = str(e.value)
        assert f"cannot write {tmp_path / 'out'}: {words}" in message and "the previous out is intact" in message
        assert isinstance(e.value, OSError) and isinstance(e.value, MegahfError) and e.value.errno == code
    with pytest.raises(FileNotFoundError):  # anything else passes through unchanged
        with explain_write_errors(tmp_path / "out", intact="x"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")


def _preprocess_args(corpus: Path, prefix: Path) -> list[str]:
    return ["preprocess", "--input", str(corpus), "--tokenizer", "gpt2", "--output-prefix", str(prefix),
            "--append-eod", "--workers", "1", "--no-progress"]


def test_preprocess_disk_full_keeps_the_previous_outputs(tmp_path, monkeypatch, capsys):
    from megahf.data.indexed_dataset import IndexedDatasetBuilder

    out = tmp_path / "out"
    assert main(_preprocess_args(write_corpus(tmp_path / "a.jsonl", 20, 1), out / "p")) == 0
    capsys.readouterr()
    before = {name: (out / name).read_bytes() for name in files_under(out)}
    # the pair and the record of the tokenizer that wrote it
    assert sorted(before) == ["p_text_document.bin", "p_text_document.idx", "p_text_document.tokenizer_identity.json"]

    def disk_full(self, arr):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IndexedDatasetBuilder, "_write", disk_full)
    assert main(_preprocess_args(write_corpus(tmp_path / "b.jsonl", 30, 2), out / "p")) == 2
    line = one_error_line(capsys.readouterr().err, "preprocess")
    assert f"cannot write {out / 'p'}_text_document.bin/.idx: the disk is full" in line
    assert "previous" in line and "intact" in line and "free some space or give an --output-prefix" in line
    assert {name: (out / name).read_bytes() for name in files_under(out)} == before  # no temporary file left


def test_preprocess_into_an_unwritable_folder_simulated(tmp_path, monkeypatch):
    from megahf.data import indexed_dataset
    from megahf.data.preprocess import preprocess_corpus

    def refuse(self, path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "__init__", refuse)
    with pytest.raises(OutputWriteError, match=r"cannot write .*p_text_document\.bin/\.idx: the folder is not "
                                               r"writable.*intact"):
        preprocess_corpus(str(write_corpus(tmp_path / "a.jsonl", 5, 1)), str(tmp_path / "new" / "p"),
                          tokenizer="gpt2")
    assert not (tmp_path / "new").exists()  # the folder it created is removed again


def test_preprocess_into_a_read_only_folder(tmp_path, capsys):
    locked = locked_folder(tmp_path / "locked")
    try:
        assert main(_preprocess_args(write_corpus(tmp_path / "a.jsonl", 5, 1), locked / "p")) == 2
        line = one_error_line(capsys.readouterr().err, "preprocess")
        assert "p_text_document.bin/.idx" in line and "not writable" in line
        assert files_under(locked) == []
    finally:
        locked.chmod(0o700)


class _Model:
    """Stands in for a model whose save fills the disk half-way through."""

    def __init__(self, fail: int | None) -> None:
        self.fail = fail

    def save_pretrained(self, path, is_main_process=True):
        os.makedirs(path, exist_ok=True)
        Path(path, "config.json").write_text("{}")
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        Path(path, "model.safetensors").write_bytes(b"weights")


class _Tokenizer:
    def save_pretrained(self, path):
        Path(path, "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "the disk is full"),
                                        (errno.EACCES, "the folder is not writable")])
def test_final_write_on_a_full_disk_keeps_the_previous_final(tmp_path, code, words):
    from megahf.training.outputs import save_final

    final = save_final(_Model(None), _Tokenizer(), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in files_under(tmp_path) if (tmp_path / name).is_file()}
    with pytest.raises(OutputWriteError) as e:
        save_final(_Model(code), _Tokenizer(), tmp_path)
    message = str(e.value)
    assert f"cannot write {final}: {words}" in message and f"the previous {final} is intact" in message
    after = {name: (tmp_path / name).read_bytes() for name in files_under(tmp_path) if (tmp_path / name).is_file()}
    assert after == before and files_under(tmp_path) == ["final", *sorted(f"final/{n}" for n in
                                                                      ("config.json", "model.safetensors",
                                                                       "tokenizer.json"))]


def test_final_write_into_a_read_only_output_dir(tmp_path):
    from megahf.training.outputs import save_final

    out = tmp_path / "out"
    final = save_final(_Model(None), _Tokenizer(), locked_folder(out).parent / "staging")  # a previous final/
    out.chmod(0o700)
    final.rename(out / "final")
    out.chmod(0o500)
    try:
        with pytest.raises(OutputWriteError, match=r"cannot write .*out/final: the folder is not writable.*the "
                                                   r"previous .*out/final is intact"):
            save_final(_Model(None), _Tokenizer(), out)
        assert files_under(out) == ["final", "final/config.json", "final/model.safetensors", "final/tokenizer.json"]
    finally:
        out.chmod(0o700)


def test_safetensors_disk_full_while_writing_final_of_a_real_model(tmp_path, monkeypatch):
    """safetensors reports a full disk as `SafetensorError("... (os error 28)")`, not as an OSError."""
    import safetensors
    import transformers.modeling_utils

    import megahf
    from megahf.assets import load_gpt2_tokenizer
    from megahf.training.outputs import save_final

    model = megahf.MegatronGPTForCausalLM(megahf.MegatronGPTConfig(num_layers=1, hidden_size=32,
                                                                    num_attention_heads=2, vocab_size=64))
    tokenizer = load_gpt2_tokenizer()
    final = save_final(model, tokenizer, tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in files_under(tmp_path) if (tmp_path / n).is_file()}

    def disk_full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    with pytest.raises(OutputWriteError, match=rf"cannot write {final}: the disk is full .*the previous {final} is "
                                               "intact.*free some space or choose another output_dir"):
        save_final(model, tokenizer, tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in files_under(tmp_path) if (tmp_path / n).is_file()} == before


def test_final_write_on_a_full_disk_leaves_no_final(tmp_path):
    from megahf.training.outputs import save_final

    with pytest.raises(OutputWriteError, match=r"the disk is full.*no .*final was written"):
        save_final(_Model(errno.ENOSPC), _Tokenizer(), tmp_path)
    assert files_under(tmp_path) == []


# ----------------------------------------------------------------------------- megahf BERT and transformers' names


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    import megahf

    folder = tmp_path_factory.mktemp("bert")
    config = megahf.MegatronBertConfig(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=64)
    megahf.MegatronBertForPreTraining(config).save_pretrained(folder)
    return folder


def test_causal_lm_from_a_megahf_bert_folder_is_a_clear_error(bert_folder):
    import megahf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForNextSentencePrediction

    from megahf.errors import UnsupportedModelError

    config = AutoConfig.from_pretrained(bert_folder)
    assert type(config) is megahf.MegatronBertConfig
    for auto, task in ((AutoModelForCausalLM, "CausalLM"), (AutoModelForNextSentencePrediction,
                                                            "NextSentencePrediction")):
        for load in (lambda: auto.from_pretrained(bert_folder), lambda: auto.from_config(config)):
            with pytest.raises(UnsupportedModelError, match=rf"MegatronBertConfig .* has no {task} model: .*"
                                                            r"AutoModelForPreTraining") as e:
                load()
            assert isinstance(e.value, ValueError)


def test_every_auto_class_of_megatron_bert_resolves_megahf_config_to_megahf():
    """transformers resolves an unregistered config class by name; no Auto class may hand megahf's config to
    transformers' own MegatronBert models."""
    import megahf
    import transformers.models.auto.modeling_auto as modeling_auto
    from transformers import MegatronBertConfig as TransformersMegatronBertConfig

    checked = 0
    for name, names in vars(modeling_auto).items():
        if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES") and "megatron-bert" in names:
            mapping = getattr(modeling_auto, name.removesuffix("_NAMES"))
            assert mapping[megahf.MegatronBertConfig].__module__.startswith("megahf."), name
            # transformers' own config still gets transformers' own model
            assert mapping[TransformersMegatronBertConfig].__module__.startswith("transformers."), name
            checked += 1
    assert checked >= 9


# ----------------------------------------------------------------------------- which errors the command line reports


def test_checkpoint_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    import megahf.cli as cli
    from megahf.training.checkpoint import CheckpointError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: gpt-tiny\n")

    def damaged(path, overrides):
        raise CheckpointError(f"{tmp_path}/checkpoints/step_0000002: the checksum of model_optim does not match\n"
                              "delete it or resume from another")

    monkeypatch.setattr(cli, "run_pretrain_verb", damaged)
    assert main(["pretrain", str(recipe)]) == 2
    line = one_error_line(capsys.readouterr().err, "pretrain")
    assert "step_0000002: the checksum of model_optim does not match delete it" in line

    def bug(path, overrides):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "run_pretrain_verb", bug)
    with pytest.raises(KeyError):
        main(["pretrain", str(recipe)])
