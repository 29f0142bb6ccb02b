"""Resumable training checkpoints: written atomically, one format for every parallel layout.

    OUTPUT_DIR/checkpoints/step_0000400/
        model_optim/            model and optimizer state through torch.distributed.checkpoint (DCP): each rank
                                writes its own shards (TP / FSDP2 DTensors, or full tensors)
        scheduler.pt            learning-rate scheduler state (plain numbers; loaded with weights_only=True)
        trainer_state.json      Trainer's state: global step (hence the data position), log history
        rng/rank_00000.json     per-rank python / numpy / torch (and CUDA) RNG states, as JSON (no pickle)
        megahf_checkpoint.json  written LAST: step, layout, batch, every file with its size

A checkpoint is written under `.step_0000400.partial/`, every file is fsynced, the marker is written last, and only
then is the folder renamed to `step_0000400`: a folder with that name either is complete or has been damaged
afterwards. Damage (a missing marker, a missing or truncated file) is detected when resuming and the next older
complete checkpoint is used, with a warning. The data position needs no file of its own: Trainer replays the seeded
sampler up to `global_step` x global batch, which is why a resume refuses a different global batch or seq length.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..atomic import atomic_write_json, fsync_dir, fsync_file, publish_folder
from ..parallel.ranks import barrier, rank

MARKER = "megahf_checkpoint.json"
MODEL_OPTIM = "model_optim"
SCHEDULER = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME: Trainer reads it on resume
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(RuntimeError):
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
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ---------------------------------------------------------------------- saving


def save_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state,
    metadata: dict,
    keep_last: int,
) -> Path:
    """Write the checkpoint of `step` atomically, on every rank (collective), then delete all but the newest
    `keep_last` complete checkpoints. `metadata` (layout, batch) goes into the marker."""
    root = Path(checkpoints_dir)
    final = root / step_dir_name(step)
    partial = root / f".{final.name}.partial"
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "rng").mkdir(parents=True)
    barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial / MODEL_OPTIM))
    atomic_write_json(partial / "rng" / f"rank_{rank():05d}.json", rng_state(), durable=True)
    if rank() == 0:
        torch.save(scheduler.state_dict(), partial / SCHEDULER)
        trainer_state.save_to_json(str(partial / TRAINER_STATE))
    barrier()

    if rank() == 0:
        files = {}
        for path in sorted(p for p in partial.rglob("*") if p.is_file()):
            fsync_file(path)
            files[str(path.relative_to(partial))] = path.stat().st_size
        for folder in (partial / MODEL_OPTIM, partial / "rng", partial):
            fsync_dir(folder)
        atomic_write_json(partial / MARKER, {"format": FORMAT_VERSION, "step": step, **metadata, "files": files},
                          durable=True)
        publish_folder(partial, final, durable=True)  # replaces a damaged checkpoint of the same step
        for old in complete_checkpoints(root)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# ---------------------------------------------------------------------- finding and checking


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint folder cannot be resumed from, or None if it is complete."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the write did not finish)"
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MARKER} ({type(error).__name__})"
    if meta.get("format") != FORMAT_VERSION:
        return f"format {meta.get('format')!r}, this megahf reads {FORMAT_VERSION}"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def _step_dirs(root: Path) -> list[Path]:
    """`step_NNNNNNN` folders, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    return [p for p in _step_dirs(Path(root)) if checkpoint_problem(p) is None]


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


def load_model(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load the model's state from a checkpoint, resharded to the model's current layout (collective)."""
    state = {"model": get_model_state_dict(model)}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(Path(path) / MODEL_OPTIM))
    set_model_state_dict(model, state["model"])


def load_optimizer(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    state = {"optim": get_optimizer_state_dict(model, optimizer)}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(Path(path) / MODEL_OPTIM))
    set_optimizer_state_dict(model, optimizer, state["optim"])


def load_scheduler(path: str | os.PathLike, scheduler) -> None:
    scheduler.load_state_dict(torch.load(Path(path) / SCHEDULER, weights_only=True))


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


__all__ = ["CheckpointError", "MARKER", "checkpoint_problem", "complete_checkpoints", "latest_checkpoint",
           "load_model", "load_optimizer", "load_rng", "load_scheduler", "read_metadata", "rng_state",
           "save_checkpoint", "set_rng_state", "step_dir_name"]
