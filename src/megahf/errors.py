"""megahf's user-facing errors: one base class, and the one place where a failed write is explained.

Every error raised because of what the user gave (a recipe, a data file, a checkpoint, a folder to write into)
derives from `MegahfError`; its message names the thing, the value and the fix, so the command line prints it as
one line (`megahf VERB: error: MESSAGE`, exit status 2) instead of a traceback. Each subclass also keeps the
builtin base it had before (`ValueError`, `OSError`, ...), so existing `except` clauses still catch it.

megahf's user-facing errors: `RecipeError` (megahf.recipe), `IndexedDatasetError` and `IndexedDatasetNotFoundError`
(megahf.data.indexed_dataset), `GPTDatasetError`, `BertDatasetError`, `PreprocessError` (megahf.data),
`CheckpointError` (megahf.training.checkpoint), `NonFiniteError` (megahf.training.trainer: a NaN loss),
`MallocSettingError` (megahf.training.cpu_malloc: a bad `MEGAHF_CPU_MALLOC`),
`EvaluationError` (megahf.tasks.common), `TaskDataError` (megahf.tasks.task_spec), `UnknownMetricError`
(megahf.metrics), and here `OutputWriteError` and `UnsupportedModelError`.

This module imports nothing but the standard library (`megahf --help` reads it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator


class MegahfError(Exception):
    """Bad input or an unusable output location, explained in the message (what, which value, the fix)."""


class OutputWriteError(MegahfError, OSError):
    """An output could not be written (disk full, folder not writable); the message names the path and says that
    the previous outputs are intact. `errno` and `filename` are those of the failure, as on any `OSError`."""

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno N] strerror: filename"
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UnsupportedModelError(MegahfError, ValueError):
    """An Auto class asked for a model megahf does not have for a megahf config (e.g. a causal LM from BERT)."""


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")

#: errno -> (what it means for the user, what fixes it): the one table of write failures megahf explains
WRITE_FAILURES = {
    errno.ENOSPC: ("the disk is full", "free some space"),
    errno.EDQUOT: ("the disk quota is exhausted", "free some space"),
    errno.EACCES: ("the folder is not writable (permission denied)", "make the folder writable"),
    errno.EPERM: ("the folder is not writable (operation not permitted)", "make the folder writable"),
    errno.EROFS: ("the file system is read-only", "remount it read-write"),
}


@contextlib.contextmanager
def explain_write_errors(path: str | os.PathLike, intact: str, elsewhere: str = "choose another location"
                         ) -> Iterator[None]:
    """Turn an `OSError` of a full disk or an unwritable folder raised in the block (or the error of a Rust extension
    that wraps one, as safetensors' `SafetensorError` does) into an `OutputWriteError`
    naming `path` (the output as the user knows it, not the temporary name that failed), what happened, `intact`
    (what the user still has: "the previous final/ is intact") and the fix (`elsewhere`: the option that moves the
    output). Other errors pass through unchanged. The block must itself leave nothing half-written where a reader
    would take it for complete (megahf writes under temporary names), which is what makes `intact` true."""
    try:
        yield
    except OutputWriteError:
        raise
    except Exception as error:
        code = _os_error_code(error)
        if code not in WRITE_FAILURES:
            raise
        what, remedy = WRITE_FAILURES[code]
        explained = OutputWriteError(
            f"cannot write {os.fspath(path)}: {what} ({os.strerror(code)}); {intact}; {remedy} or {elsewhere}, then "
            "run again"
        )
        explained.errno, explained.strerror, explained.filename = code, os.strerror(code), os.fspath(path)
        raise explained from error


def _os_error_code(error: Exception) -> int | None:
    """The errno of an `OSError`, or of an error from a Rust extension that wraps one: safetensors raises
    `SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")`."""
    if isinstance(error, OSError):
        return error.errno
    if isinstance(error, MegahfError):
        return None
    found = _RUST_OS_ERROR.search(str(error))
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def alike_on_every_rank() -> Iterator[None]:
    """Mark the `MegahfError` raised in the block as one that every process of a launch meets alike: the checks of
    the command line, the recipe and the launch config, run before any process group or compute exists, read the
    same inputs in every process. The command line prints such an error once per launcher (`prints_here`)."""
    try:
        yield
    except MegahfError as error:
        error.alike_on_every_rank = True
        raise


def prints_here(error: MegahfError) -> bool:
    """Whether this process prints `error`: all do, except for an error marked `alike_on_every_rank`, which only the
    first process of each launcher prints (LOCAL_RANK 0: once on one machine, once in each node's log on several,
    where a node's processes read their files alike but nodes need not). The others exit with the same status."""
    return not getattr(error, "alike_on_every_rank", False) or os.environ.get("LOCAL_RANK", "0") == "0"


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message's own line breaks become spaces)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


TRAINING_CHECKPOINT_MARKER = "megahf_checkpoint.json"  # megahf.training.checkpoint.MARKER


def training_checkpoint_hint(path: str | os.PathLike) -> str | None:
    """If `path` is a megahf training checkpoint (each rank's model and optimizer shards, of any layout, a pipelined
    one included) rather than a model folder: what it is and how to get a model folder from it; else None."""
    if not os.path.isfile(os.path.join(path, TRAINING_CHECKPOINT_MARKER)):
        return None
    return (f"{path} is a megahf training checkpoint (each rank's shards), not a model folder: use the run's "
            f"final/ folder, or write one with `megahf convert --from megahf --to megahf {path} NEW_FOLDER`")


__all__ = ["TRAINING_CHECKPOINT_MARKER", "WRITE_FAILURES", "MegahfError", "OutputWriteError", "UnsupportedModelError",
           "alike_on_every_rank", "explain_write_errors", "one_line", "prints_here", "training_checkpoint_hint"]
