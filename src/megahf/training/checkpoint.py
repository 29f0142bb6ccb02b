"""Resumable training checkpoints: written atomically, one format for every parallel layout.

    OUTPUT_DIR/checkpoints/step_0000400/
        model_optim/            model and optimizer state through torch.distributed.checkpoint (DCP): each rank
                                writes its own shards (TP / FSDP2 DTensors, or full tensors); frozen parameters
                                (a LoRA run's base model) are left out
        scheduler.pt            learning-rate scheduler state (plain numbers; loaded with weights_only=True)
        trainer_state.json      Trainer's state: global step (hence the data position), log history
        rng/rank_00000.json     per-rank python / numpy / torch (and CUDA) RNG states, as JSON (no pickle)
        megahf_checkpoint.json  written LAST: step, layout, batch, model config, every file with its size and CRC-32

A checkpoint is written under `.step_0000400.partial/`, every file is fsynced, the marker is written last, and only
then is the folder renamed to `step_0000400`: a folder with that name either is complete or has been damaged
afterwards. A write that fails (a full disk) removes the partial folder and stops the run with the reason; the older
checkpoints are untouched. The checksums are computed from the bytes as they are written, by the rank that writes
them (`checksums.py`: no second read). Before resuming, every file is checked against its size and checksum and every
pickle is
read the safe way (`safe_checkpoint_reader`: nothing in a checkpoint can run code); a checkpoint failing any check
is reported and the next older complete one used. The data position needs no file of its own: Trainer replays the
seeded sampler up to `global_step` x global batch (the consumed samples), which is why a resume refuses a different
global batch or seq length, but not another layout (`resume.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..atomic import atomic_write_json, fsync_dir, fsync_file, publish_folder
from ..errors import TRAINING_CHECKPOINT_MARKER, WRITE_FAILURES, MegahfError
from ..parallel.ranks import barrier, is_distributed, rank
from ..parallel.rng import get_rng_tracker
from .checksums import CHECKSUM, HashingFileSystem, file_digest
from .safe_checkpoint_reader import SafeFileSystemReader, UnsafePickleError, check_dcp_folder, load_weights_only

MARKER = TRAINING_CHECKPOINT_MARKER
MODEL_OPTIM = "model_optim"
SCHEDULER = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME: Trainer reads it on resume
FORMAT_VERSION = 4  # 2: every file's sha256 and the model config in the marker; 3: CRC-32 instead; 4: XXH3-128
READABLE_FORMATS = (1, 2, 3, 4)  # 1 (sizes only) is still resumed, with a warning (resume.py)
_DIGEST_OF_FORMAT = {2: "sha256", 3: "crc32", 4: CHECKSUM}
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(MegahfError, RuntimeError):
    """A checkpoint cannot be used (incomplete, damaged, or written for another batch layout)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ---------------------------------------------------------------------- RNG states as JSON


def rng_state() -> dict:
    """This process's python, numpy and torch RNG states in JSON-able form."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.random.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    if get_rng_tracker().is_seeded():  # the per-rank dropout stream of tensor parallelism
        state["model_parallel"] = get_rng_tracker().state_dict()
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    if "model_parallel" in state:
        get_rng_tracker().load_state_dict(state["model_parallel"])


# ---------------------------------------------------------------------- saving


@dataclasses.dataclass
class PendingCheckpoint:
    """A checkpoint whose files are being written (in the background with `async_save`); `finish_checkpoint` writes
    its marker and publishes it once every rank's write has finished."""

    root: Path
    final: Path
    partial: Path
    step: int
    metadata: dict
    keep_last: int
    writer: FileSystemWriter | None = None
    future: Future | None = None  # the background write (async_save), None when written already


_async_group = None


def _async_process_group():
    """A gloo group of its own for the background writes' collectives, so that they never interleave with the
    training's (torch's advice for async_save); created on first use, by every rank at the same point."""
    global _async_group
    if _async_group is None and is_distributed():
        _async_group = dist.new_group(backend="gloo")
    return _async_group


def save_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state,
    metadata: dict,
    keep_last: int,
    async_save: bool = False,
) -> Path | PendingCheckpoint:
    """Write the checkpoint of `step` atomically, on every rank (collective), then delete all but the newest
    `keep_last` complete checkpoints. `metadata` (layout, batch, model config) goes into the marker. A failed write
    (full disk, read-only folder) on any rank raises `CheckpointError` on every rank, saying why and that the older
    checkpoints are intact; nothing of the failed one is left under a checkpoint's name.

    With `async_save` the model and optimizer state are copied to CPU memory and written by a background thread
    (torch.distributed.checkpoint's async_save): the `PendingCheckpoint` returned is published by
    `finish_checkpoint`, which writes the marker only after every rank's write has finished."""
    root = Path(checkpoints_dir)
    final = root / step_dir_name(step)
    pending = PendingCheckpoint(root, final, root / f".{final.name}.partial", step, metadata, keep_last)
    partial = pending.partial

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "rng").mkdir(parents=True)

    def write_states() -> None:  # every rank
        model_sd, optim_sd = trained_state(model), optimizer_state(model, optimizer)
        pending.writer = FileSystemWriter(partial / MODEL_OPTIM)
        pending.writer.fs = HashingFileSystem()  # checksums computed from the bytes as they are written
        with _quiet_single_process():
            if async_save:
                pending.future = dcp.async_save({"model": model_sd, "optim": optim_sd}, storage_writer=pending.writer,
                                                process_group=_async_process_group())
            else:
                dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=pending.writer)
        atomic_write_json(partial / "rng" / f"rank_{rank():05d}.json", rng_state(), durable=True)
        if rank() == 0:
            with open(partial / SCHEDULER, "wb") as f:  # a Python file: a failed write keeps its errno
                torch.save(scheduler.state_dict(), f)
            trainer_state.save_to_json(str(partial / TRAINER_STATE))

    _run_on_all_ranks_or_fail(prepare if rank() == 0 else None, final, partial)
    _run_on_all_ranks_or_fail(write_states, final, partial)
    return pending if async_save else finish_checkpoint(pending)


def finish_checkpoint(pending: PendingCheckpoint, wait: bool = True) -> Path | None:
    """Publish `pending` (collective): wait for every rank's write (`wait=False`: return None at once unless all
    have finished), then on rank 0 list every file with its size and checksum in the marker, written last, rename
    the folder to its final name and delete the checkpoints beyond `keep_last`."""
    final, partial = pending.final, pending.partial
    if not wait and not all(_gather(pending.future is None or pending.future.done())):
        return None

    def wait_for_write() -> None:
        if pending.future is not None:
            pending.future.result()  # re-raises a failed background write

    _run_on_all_ranks_or_fail(wait_for_write, final, partial)
    written = {Path(name).relative_to(partial).as_posix(): digest
               for name, digest in (pending.writer.fs.digests.items() if pending.writer else ())}
    digests = _gather(written)

    def complete() -> None:
        files = describe_files(partial, known={k: v for rank_files in digests for k, v in rank_files.items()})
        for folder in (partial / MODEL_OPTIM, partial / "rng", partial):
            fsync_dir(folder)
        atomic_write_json(partial / MARKER, {"format": FORMAT_VERSION, "step": pending.step, **pending.metadata,
                                             "files": files}, durable=True)
        publish_folder(partial, final, durable=True)  # replaces a damaged checkpoint of the same step

    _run_on_all_ranks_or_fail(complete if rank() == 0 else None, final, partial)
    if rank() == 0:
        for old in complete_checkpoints(pending.root, contents=False)[pending.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _run_on_all_ranks_or_fail(action, final: Path, partial: Path) -> None:
    """Run `action` (None: nothing on this rank), then agree with the other ranks (collective): if it failed on any,
    rank 0 removes the partial folder and every rank raises the same `CheckpointError`."""
    failure, error = None, None
    if action is not None:
        try:
            action()
        except (Exception, CheckpointException) as caught:  # DCP's CheckpointException is a BaseException
            error, failure = caught, f"rank {rank()}: {write_failure_cause(caught, partial)}"
    failures = _gather(failure)
    if not any(failures):
        return
    if rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)  # also frees what the failed write took
    intact = complete_checkpoints(final.parent, contents=False)
    previous = f"the same command resumes from {intact[0].name}" if intact else "there is none yet"
    raise CheckpointError(
        f"cannot write checkpoint {final}: {'; '.join(f for f in failures if f)}. Nothing was published under that "
        f"name and the previous checkpoints are intact ({previous}); free space or make the folder writable, or "
        "set output_dir to another disk"
    ) from error  # the traceback, for a failure that is not the disk's


def _gather(value):
    """Every rank's `value`, in rank order (collective)."""
    if not is_distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def write_failure_cause(error: BaseException, folder: Path) -> str:
    """Why writing into `folder` failed, in words: the disk is full, the folder is not writable, or the error. torch
    turns a failed write into "unexpected pos N vs M" and DCP wraps it again: the OSError is found inside."""
    os_error = _find_exception(error, OSError)
    if os_error is not None and os_error.errno is not None:
        where, code = os_error.filename or folder, os_error.errno
        what = WRITE_FAILURES[code][0] if code in WRITE_FAILURES else "the write failed"
        return f"{where}: {what} ({errno.errorcode.get(code, code)}: {os.strerror(code)})"
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        if free < 1 << 20:  # the error did not say, the disk does
            return f"{folder}: {WRITE_FAILURES[errno.ENOSPC][0]} ({free} bytes free; {_first_line(error)})"
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _find_exception(error: BaseException, kind: type) -> BaseException | None:
    """The first `kind` in `error`'s causes and contexts, and inside DCP's per-rank failures."""
    todo, seen = [error], set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind):
            return current
        todo += [current.__cause__, current.__context__]
        if isinstance(current, CheckpointException):  # {rank: (exception, traceback)}
            todo += [failure[0] for failure in current.failures.values()]
    return None


def _hash_all(folder: Path, names: list[str], name: str = CHECKSUM) -> dict[str, str]:
    """The digest of each file, several at once (the digests release the GIL: the disk is the limit)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda file: file_digest(folder / file, name), names)))


def describe_files(folder: Path, known: dict[str, str] | None = None) -> dict[str, dict]:
    """Every file under `folder`, fsynced, as {relative name: {"bytes": size, "xxh3_128": hex}} for the marker. `known`
    holds the checksums computed while writing ({relative name: hex}); only the other files are read back."""
    known = known or {}
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in paths:
        fsync_file(path)
    names = [p.relative_to(folder).as_posix() for p in paths]
    digests = {**_hash_all(folder, [n for n in names if n not in known]), **known}
    return {name: {"bytes": (folder / name).stat().st_size, CHECKSUM: digests[name]} for name in names}


# ---------------------------------------------------------------------- finding and checking


def checkpoint_problem(path: str | os.PathLike, contents: bool = True) -> str | None:
    """Why the checkpoint folder cannot be resumed from, or None if it is complete. Always checked: the marker,
    and every file it lists there with its size. With `contents` (what a resume does): every file's checksum, then
    every pickle read the safe way, so that a flipped bit or a crafted pickle is found before anything is loaded."""
    path = Path(path)
    listed, problem = _listed_files(path)
    if problem:
        return problem
    for name, (size, _) in listed.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    if not contents:
        return None
    return _checksum_problem(path, listed) or _unsafe_pickle_problem(path)


def _listed_files(path: Path) -> tuple[dict[str, tuple[int, tuple[str, str] | None]], str | None]:
    """The marker's files as {name: (size, (digest name, hex), or None in format 1)}, or why the marker cannot be
    used."""
    marker = path / MARKER
    if not marker.is_file():
        return {}, f"no {MARKER} (the write did not finish)"
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
        if meta.get("format") not in READABLE_FORMATS:
            return {}, f"format {meta.get('format')!r}, this megahf reads {' and '.join(map(str, READABLE_FORMATS))}"
        digest = _DIGEST_OF_FORMAT.get(meta["format"])
        listed = {name: (entry, None) if digest is None else (entry["bytes"], (digest, entry[digest]))
                  for name, entry in meta["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return {}, f"unreadable {MARKER} ({type(error).__name__})"
    for name in listed:
        if Path(name).is_absolute() or ".." in Path(name).parts:  # the marker may only name files inside
            return {}, f"{MARKER} lists {name!r}, outside the checkpoint"
    return listed, None


def _checksum_problem(path: Path, listed: dict[str, tuple[int, tuple[str, str] | None]]) -> str | None:
    expected = {name: digest for name, (_, digest) in listed.items() if digest is not None}
    if not expected:
        return None
    kind = next(iter(expected.values()))[0]
    actual = _hash_all(path, sorted(expected), kind)
    for name, (_, digest) in expected.items():
        if actual[name] != digest:
            return f"{name} does not match its {kind} (changed after it was written)"
    return None


def _unsafe_pickle_problem(path: Path) -> str | None:
    """Read every pickle a resume reads (DCP metadata and byte records, the scheduler) without running any code."""
    try:
        check_dcp_folder(path / MODEL_OPTIM)
        load_weights_only(path / SCHEDULER, SCHEDULER)
    except UnsafePickleError as error:
        return str(error)
    except OSError as error:
        return f"{Path(error.filename or path).name} cannot be read ({error.strerror})"
    return None


def _step_dirs(root: Path) -> list[Path]:
    """`step_NNNNNNN` folders, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def complete_checkpoints(root: str | os.PathLike, contents: bool = True) -> list[Path]:
    """The checkpoints under `root` that pass `checkpoint_problem`, newest first; `contents=False` skips reading
    every file (what choosing which old ones to delete needs)."""
    return [p for p in _step_dirs(Path(root)) if checkpoint_problem(p, contents) is None]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`; each newer damaged one is reported with a warning."""
    for path in _step_dirs(Path(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is incomplete or damaged ({problem}); trying the previous one",
                      stacklevel=2)
    return None


def read_metadata(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------- loading


def _dcp_load(state: dict, path: str | os.PathLike) -> None:
    """`dcp.load` through megahf's safe reader; a refused pickle is a `CheckpointError` naming the file."""
    reader = SafeFileSystemReader(Path(path) / MODEL_OPTIM)
    try:
        reader.read_metadata()  # DCP would turn a refusal here into an AssertionError's text: refuse it first
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader)
    except (CheckpointException, UnsafePickleError) as error:
        refused = _find_exception(error, UnsafePickleError)
        if refused is None:
            raise
        raise CheckpointError(f"checkpoint {path}: {refused}") from None


def trained_state(model: torch.nn.Module) -> dict:
    """The model's state as a checkpoint holds it: all of it but the frozen parameters (LoRA's and QLoRA's base model,
    as it was loaded, with what bitsandbytes stores under a quantized weight's name), which a resume loads from the
    pretrained model again."""
    state = get_model_state_dict(model)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    if not frozen:
        return state

    def is_frozen(key: str) -> bool:
        return key in frozen or any(key[:i] in frozen for i, char in enumerate(key) if char == ".")

    return {key: value for key, value in state.items() if not is_frozen(key)}


def load_model(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load the model's state from a checkpoint, resharded to the model's current layout (collective); its frozen
    parameters stay as they are (`trained_state`)."""
    state = {"model": trained_state(model)}
    _dcp_load(state, path)
    frozen = any(not p.requires_grad for p in model.parameters())
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not frozen))


def load_optimizer(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   same_layout: bool = True) -> None:
    """Load the optimizer's state, resharded to the model's current layout (collective). On another layout only the
    per-parameter state (Adam's step and moments, keyed by parameter name) is read: the parameter groups are
    numbered, and their number follows the layout (Trainer gives each device mesh its own group), so the groups'
    values stay this run's (the recipe's), and the learning rate is the resumed scheduler's (`load_scheduler`)."""
    current = optimizer_state(model, optimizer)
    # a pipeline's stages hold different groups, which a checkpoint stores once: read the per-parameter state only
    same_layout = same_layout and not hasattr(model, "_megahf_pipeline")
    state = {"optim": current if same_layout else {"state": current["state"]}}
    _dcp_load(state, path)
    if not same_layout:
        state["optim"]["param_groups"] = current["param_groups"]
    set_optimizer_state_dict(model, optimizer, _from_checkpoint_names(model, state["optim"]))


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Parameters whose optimizer state a checkpoint holds under another's name: a pipeline's last stage keeps a
    copy of the tied word embeddings as its output layer (`parallel/pipeline.py`), stored as the embedding, as one
    process holds the tied weight, so that checkpoints move between pipelined and other layouts."""
    return getattr(model, "_megahf_checkpoint_aliases", {})


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, as a checkpoint holds it (the aliases renamed, or dropped where
    this rank also holds the parameter they copy)."""
    state = get_optimizer_state_dict(model, optimizer)
    aliases = _aliases(model)
    if not aliases:
        return state
    held = set(state["state"])

    def name(key: str) -> str | None:
        source = aliases.get(key)
        return key if source is None else (None if source in held else source)

    return {"state": {name(k): v for k, v in state["state"].items() if name(k) is not None},
            "param_groups": [{**group, "params": [name(k) for k in group["params"] if name(k) is not None]}
                             for group in state["param_groups"]]}


def _from_checkpoint_names(model: torch.nn.Module, state: dict) -> dict:
    """`optimizer_state`'s renaming undone: each alias takes the state stored under the name of what it copies."""
    aliases = _aliases(model)
    if not aliases:
        return state
    held = {name for name, _ in model.named_parameters()}
    per_param = dict(state["state"])
    groups = [dict(group, params=list(group["params"])) for group in state["param_groups"]]
    for alias, source in aliases.items():
        if source in held:  # dropped beside its source on this rank: a copy of the source's state
            per_param[alias] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                for k, v in per_param[source].items()}
            next(group for group in groups if source in group["params"])["params"].append(alias)
        else:  # stored under the source's name
            per_param[alias] = per_param.pop(source)
            for group in groups:
                group["params"] = [alias if k == source else k for k in group["params"]]
    return {"state": per_param, "param_groups": groups}


def load_scheduler(path: str | os.PathLike, scheduler) -> None:
    try:
        state = load_weights_only(Path(path) / SCHEDULER, SCHEDULER)
    except UnsafePickleError as error:
        raise CheckpointError(f"checkpoint {path}: {error}") from None
    scheduler.load_state_dict(fit_scheduler_state(state, len(scheduler.optimizer.param_groups), path))
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # what the saved optimizer's groups held: the schedule's value at the saved step


_PER_GROUP = ("base_lrs", "_last_lr", "lr_lambdas")


def fit_scheduler_state(state: dict, groups: int, path: str | os.PathLike = "") -> dict:
    """The scheduler state for an optimizer of `groups` parameter groups. The number of groups follows the layout
    (Trainer gives each device mesh its own group), the schedule does not: every group has the same learning rate
    and lambda, so the saved per-group lists are cut or repeated to fit. Groups that differed are refused."""
    lists = {key: state[key] for key in _PER_GROUP if isinstance(state.get(key), list)}
    if all(len(values) == groups for values in lists.values()):
        return state
    uneven = [key for key, values in lists.items() if any(v != values[0] for v in values)]
    if uneven or any(not values for values in lists.values()):
        raise CheckpointError(
            f"checkpoint {path}: its scheduler holds per-group values that differ ({', '.join(uneven)}), which cannot "
            f"be spread over the {groups} parameter groups of this layout; resume it on the layout it was written with"
        )
    return {**state, **{key: [values[0]] * groups for key, values in lists.items()}}


def load_rng(path: str | os.PathLike) -> bool:
    """Restore this rank's RNG states; False (and a warning) if the checkpoint has none for this rank."""
    file = Path(path) / "rng" / f"rank_{rank():05d}.json"
    if not file.is_file():
        warnings.warn(f"{file} not found (the checkpoint was written by fewer processes): the random streams "
                      "(dropout) of this rank start afresh, so the resumed run is not bitwise the uninterrupted one",
                      stacklevel=2)
        return False
    set_rng_state(json.loads(file.read_text(encoding="utf-8")))
    return True


__all__ = ["CheckpointError", "MARKER", "PendingCheckpoint", "checkpoint_problem", "complete_checkpoints",
           "describe_files", "finish_checkpoint", "fit_scheduler_state", "latest_checkpoint",
           "load_model", "load_optimizer", "load_rng", "load_scheduler", "read_metadata", "rng_state",
           "save_checkpoint", "set_rng_state", "step_dir_name", "trained_state", "write_failure_cause"]
