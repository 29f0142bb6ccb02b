"""A checkpoint is untrusted input (DESIGN principle 8): a crafted pickle in any file is refused without running, a
flipped bit is found by its checksum, a changed model is refused before loading, and a full disk while writing says so
and leaves the older checkpoints as they were. Each refusal names the file and the run resumes from the previous
complete checkpoint, ending exactly where the uninterrupted run ends."""

from __future__ import annotations

import builtins
import errno
import gc
import io
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from megahf.training import RecipeError, load_recipe, run_pretrain
from megahf.training import checkpoint as ckpt
from megahf.training.safe_checkpoint_reader import SafeFileSystemReader

sys.path.insert(0, str(Path(__file__).parent))
from test_resume import _save, assert_same_run, recipe_args  # noqa: E402
from test_resume import corpus, straight  # noqa: E402, F401  (the module-scoped runs are shared)

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
from _launch import RECIPE  # noqa: E402


# ---------------------------------------------------------------------- crafted files


class _OpensAFile:
    """Unpickling this opens (so creates) `path` for writing: code run by merely reading a checkpoint."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payload(target: Path, size: int) -> bytes:
    """A pickle that creates `target`, padded with NULs to `size` bytes (pickle stops at its STOP opcode)."""
    data = pickle.dumps(_OpensAFile(target), protocol=2)
    assert len(data) <= size
    return data + b"\0" * (size - len(data))


def _byte_record(checkpoint: Path, fqn: str) -> tuple[Path, int, int]:
    """Where DCP stored the byte record `fqn`: (file, offset, length)."""
    metadata = SafeFileSystemReader(checkpoint / ckpt.MODEL_OPTIM).read_metadata()
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == fqn)
    return checkpoint / ckpt.MODEL_OPTIM / info.relative_path, info.offset, info.length


def _overwrite(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _plant(checkpoint: Path, where: str, target: Path) -> None:
    """Put a code-running pickle into `where` of `checkpoint`, keeping every size."""
    if where == "model_optim/.metadata":
        metadata = checkpoint / where
        metadata.write_bytes(_payload(target, metadata.stat().st_size))
    elif where == "byte record":
        file, offset, length = _byte_record(checkpoint, "optim.param_groups.0.lr")
        _overwrite(file, offset, _payload(target, length))  # torch.load falls back to the legacy format: pickle.load
    else:
        buffer = io.BytesIO()
        torch.save(_OpensAFile(target), buffer)
        (checkpoint / where).write_bytes(buffer.getvalue())


def _reseal(checkpoint: Path) -> None:
    """Rewrite the marker's sizes and checksums as an attacker who edits files would: only the reader stands."""
    meta = ckpt.read_metadata(checkpoint)
    meta["files"] = ckpt.describe_files(checkpoint)
    del meta["files"][ckpt.MARKER]
    (checkpoint / ckpt.MARKER).write_text(json.dumps(meta))


REFUSALS = {
    "model_optim/.metadata": r"model_optim/\.metadata refused: it references \w+\.open, which is not part of "
                             r"torch\.distributed\.checkpoint's metadata",
    "byte record": r"model_optim/__0_0\.distcp \(record optim\.param_groups\.0\.lr\) refused",
    "scheduler.pt": r"scheduler\.pt refused: Unsupported global: GLOBAL \w+\.open \(not plain data\)",
}


@pytest.mark.parametrize("where", list(REFUSALS))
def test_a_crafted_pickle_is_refused_and_the_previous_checkpoint_used(corpus, straight, tmp_path, where):
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    newest, target = out / "checkpoints" / "step_0000006", tmp_path / "created_by_the_checkpoint"
    _plant(newest, where, target)
    _reseal(newest)  # sizes and checksums fit: the refusal is the reader's
    with pytest.warns(UserWarning, match=r"step_0000006 is incomplete or damaged \(" + REFUSALS[where]):
        result = run_pretrain(load_recipe(RECIPE, recipe_args(corpus, out)))
    assert not target.exists(), "reading the checkpoint ran its code"
    assert result.metrics["resumed_from"].endswith("step_0000003")
    assert_same_run(out, straight)


@pytest.mark.parametrize("where", list(REFUSALS))
def test_the_loaders_refuse_a_crafted_pickle_too(tmp_path, where):
    """Were a checkpoint changed after it was checked, loading it still runs nothing: one line naming the file."""
    path = _save(tmp_path / "checkpoints", 1)
    target = tmp_path / "created_by_the_checkpoint"
    _plant(path, where, target)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    load = {"model_optim/.metadata": lambda: ckpt.load_model(path, model),
            "byte record": lambda: ckpt.load_optimizer(path, model, optimizer),
            "scheduler.pt": lambda: ckpt.load_scheduler(path, scheduler)}[where]
    with pytest.raises(ckpt.CheckpointError, match=REFUSALS[where]) as refused:
        load()
    assert "\n" not in str(refused.value)
    assert not target.exists(), "loading the checkpoint ran its code"


def test_the_metadata_allow_list_is_exactly_what_a_checkpoint_references(tmp_path):
    """Every global a real `.metadata` needs is allowed and nothing more (torch's dtypes aside); should torch's
    metadata change, this names the difference to review."""
    import pathlib
    from collections import OrderedDict

    from megahf.training.safe_checkpoint_reader import _METADATA_GLOBALS, MetadataUnpickler, UnsafePickleError

    referenced = set()

    class Recording(MetadataUnpickler):
        def find_class(self, module, name):
            referenced.add((module, name))
            return super().find_class(module, name)

    with open(_save(tmp_path, 1) / "model_optim" / ".metadata", "rb") as f:
        Recording(f).load()
    dtypes = {(module, name) for module, name in referenced if isinstance(getattr(torch, name, None), torch.dtype)}
    this_pythons = {g for g in _METADATA_GLOBALS if not g[0].startswith("pathlib")} | {
        (pathlib.PosixPath.__module__, "PosixPath")}
    assert referenced - dtypes == this_pythons
    with pytest.raises(UnsafePickleError, match="it references collections.OrderedDict, which is not part of"):
        MetadataUnpickler(io.BytesIO(pickle.dumps(OrderedDict()))).load()


def test_a_flipped_byte_in_a_model_shard_falls_back_to_the_previous_checkpoint(corpus, straight, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    shard = out / "checkpoints" / "step_0000006" / "model_optim" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor: the size stays, the weights change
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step_0000006 is incomplete or damaged \(model_optim/__0_0\.distcp does "
                                         r"not match its xxh3_128"):
        result = run_pretrain(load_recipe(RECIPE, recipe_args(corpus, out)))
    assert result.metrics["resumed_from"].endswith("step_0000003")
    assert_same_run(out, straight)


def test_the_marker_holds_every_file_with_its_size_and_checksum(tmp_path):
    """The checksums computed while DCP wrote equal those of the files read back (and every file is listed)."""
    import xxhash

    path = _save(tmp_path, 1)
    files = ckpt.read_metadata(path)["files"]
    assert set(files) == {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {ckpt.MARKER}
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}, name


@pytest.mark.parametrize("version,digest", [(2, "sha256"), (3, "crc32")])
def test_a_marker_of_an_older_format_has_its_checksums_checked(tmp_path, version, digest):
    """Checkpoints written before XXH3-128 (format 2: sha256, format 3: CRC-32) are still verified byte for byte."""
    from megahf.training.checksums import file_digest

    older = _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    for path in (older, newest):
        meta = ckpt.read_metadata(path)
        meta.update(format=version, files={name: {"bytes": entry["bytes"], digest: file_digest(path / name, digest)}
                                           for name, entry in meta["files"].items()})
        (path / ckpt.MARKER).write_text(json.dumps(meta))
    assert ckpt.latest_checkpoint(tmp_path) == newest
    shard = newest / "model_optim" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step_0000002 is incomplete or damaged \(model_optim/__0_0\.distcp does "
                                         rf"not match its {digest}"):
        assert ckpt.latest_checkpoint(tmp_path) == older


def test_a_marker_naming_a_file_outside_the_checkpoint_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    meta = ckpt.read_metadata(path)
    meta["files"]["../elsewhere"] = {"bytes": 1, "xxh3_128": "0" * 32}
    (path / ckpt.MARKER).write_text(json.dumps(meta))
    assert "lists '../elsewhere', outside the checkpoint" in ckpt.checkpoint_problem(path)


def test_a_checkpoint_of_marker_format_1_is_resumed_with_a_warning(corpus, straight, tmp_path):
    """Format 1 (sizes only, before checksums): still resumed, its pickles read the safe way; the warning says what
    cannot be checked."""
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / "step_0000006"
    meta = ckpt.read_metadata(newest)
    meta.update(format=1, files={name: entry["bytes"] for name, entry in meta["files"].items()})
    del meta["model_config"]
    (newest / ckpt.MARKER).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"step_0000006 was written by an older megahf \(marker format 1\): its "
                                         r"files' sizes are checked but not their contents"):
        result = run_pretrain(load_recipe(RECIPE, recipe_args(corpus, out)))
    assert result.metrics["resumed_from"].endswith("step_0000006")
    assert_same_run(out, straight)


# ---------------------------------------------------------------------- a changed model


def test_resume_refuses_a_changed_model_before_loading_anything(corpus, straight):
    before = {p: p.stat().st_mtime_ns for p in (straight / "checkpoints").rglob("*")}
    recipe = load_recipe(RECIPE, recipe_args(corpus, straight, **{"model_overrides.num_layers": 3}))
    with pytest.raises(RecipeError, match=r"step_0000006 was written with the model field num_layers=2, the recipe "
                                          r"now gives num_layers=3: the checkpoint's weights would not fit the model; "
                                          r"set model_overrides\.num_layers to 2, or resume: none"):
        run_pretrain(recipe)
    assert {p: p.stat().st_mtime_ns for p in (straight / "checkpoints").rglob("*")} == before


# ---------------------------------------------------------------------- a full disk while writing


class _FullDisk:
    """A file whose every write fails as the operating system says (ENOSPC: no space left on the device)."""

    def __init__(self, file, path: str, code: int):
        self._file, self._path, self._code = file, path, code

    def write(self, data) -> int:
        raise OSError(self._code, os.strerror(self._code), self._path)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def __getattr__(self, attribute):
        return getattr(self._file, attribute)


def _writes_fail(monkeypatch, name_part: str, code: int) -> None:
    """Every file opened for writing whose path contains `name_part` fails on write with `code`."""
    real_open = io.open

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax") and name_part in os.fspath(file):
            return _FullDisk(handle, os.fspath(file), code)
        return handle

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # pathlib.Path.open, which DCP writes through


@pytest.mark.parametrize("name_part, code, cause", [
    ("__0_0.distcp", errno.ENOSPC, r"\S+__0_0\.distcp: the disk is full \(ENOSPC: No space left on device\)"),
    ("scheduler.pt", errno.ENOSPC, r"\S+scheduler\.pt: the disk is full \(ENOSPC: No space left on device\)"),
    (ckpt.MARKER, errno.ENOSPC, r"\S+megahf_checkpoint\.json\S*: the disk is full \(ENOSPC: No space left "
                                r"on device\)"),
    ("rank_00000.json", errno.EROFS, r"\S+rank_00000\.json\S*: the file system is read-only \(EROFS: Read-only file system\)"),
])
def test_a_failed_write_says_why_and_leaves_the_previous_checkpoints_intact(tmp_path, monkeypatch, name_part, code,
                                                                            cause):
    previous = _save(tmp_path, 1)
    _writes_fail(monkeypatch, name_part, code)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint \S+step_0000002: rank 0: " + cause
                       + r"\. Nothing was published under that name and the previous checkpoints are intact \(the same "
                         r"command resumes from step_0000001\)") as failed:
        _save(tmp_path, 2)
    assert "unexpected pos" not in str(failed.value) and "\n" not in str(failed.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000001"]  # no partial folder, nothing published
    assert ckpt.latest_checkpoint(tmp_path) == previous


def test_a_torch_write_error_without_errno_is_reported_with_the_free_space(tmp_path, monkeypatch):
    """torch's own file writer reports a full disk as "unexpected pos N vs M": the free space tells."""
    from collections import namedtuple

    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("Usage", "total used free")(10, 10, 0))
    assert ckpt.write_failure_cause(error, tmp_path) == (
        f"{tmp_path}: the disk is full (0 bytes free; RuntimeError: [enforce fail at inline_container.cc:672] "
        ". unexpected pos 704 vs 598)"
    )


def test_megahf_pretrain_reports_a_full_disk_in_one_line(corpus, tmp_path, monkeypatch, capsys):
    from megahf.cli import main

    out = tmp_path / "out"
    _writes_fail(monkeypatch, "scheduler.pt", errno.ENOSPC)
    assert main(["pretrain", str(RECIPE), *recipe_args(corpus, out)]) == 2
    gc.collect()  # an open progress bar redraws itself when it is collected
    stderr = capsys.readouterr().err
    assert stderr.count("megahf pretrain: error: ") == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.rstrip().splitlines()[-1].startswith("megahf pretrain: error: "), stderr[-3000:]  # the last line
    error = stderr.split("megahf pretrain: error: ")[1].splitlines()[0]
    assert error.startswith(f"cannot write checkpoint {out / 'checkpoints' / 'step_0000003'}: rank 0: "
                            f"{out / 'checkpoints' / '.step_0000003.partial' / 'scheduler.pt'}: the disk is full")
    assert "the disk is full (ENOSPC: No space left on device)" in error and "(there is none yet)" in error
    assert list((out / "checkpoints").iterdir()) == [] and not (out / "final").exists()


def test_checksums_computed_while_writing_equal_those_of_the_files(tmp_path):
    """Large buffers are checksummed on a helper thread while they are written: the result is the XXH3-128 of the
    file's bytes, and torch.save's own record CRC setting is back as it was afterwards."""
    import xxhash

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.utils.serialization import config as torch_serialization_config

    from megahf.training.checksums import HashingFileSystem

    state = {"big": torch.randn(3 << 20), "small": torch.arange(5)}  # 12 MB: several writes of the helper path
    writer = FileSystemWriter(tmp_path)
    writer.fs = HashingFileSystem()
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save(state, storage_writer=writer)
    files = {Path(name).name: digest for name, digest in writer.fs.digests.items()}
    assert set(files) == {".metadata", "__0_0.distcp"}
    for name, digest in files.items():
        assert digest == xxhash.xxh3_128((tmp_path / name).read_bytes()).hexdigest(), name
    assert torch_serialization_config.save.compute_crc32 is True
    loaded = {"big": torch.zeros(3 << 20), "small": torch.zeros(5, dtype=torch.long)}
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.load(loaded, checkpoint_id=tmp_path)
    assert torch.equal(loaded["big"], state["big"]) and torch.equal(loaded["small"], state["small"])
