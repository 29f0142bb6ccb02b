"""Load Megatron-LM's `model_optim_rng.pt` without letting the file run code and without Megatron installed.

The file is a torch pickle holding the model's tensors, the training `args` (an `argparse.Namespace` whose values can
be Megatron enums), the optimizer and the RNG states (numpy arrays). It is loaded with `torch.load(weights_only=True)`
plus an explicit allow-list: the Namespace, numpy's array reconstruction (what torch documents for RNG states), a few
standard-library values Megatron stores (`SimpleNamespace`, `PosixPath`, `BytesIO` of Transformer Engine's extra
state, `signal.Signals`), and inert stand-ins for Megatron's enums and its `OptimizerConfig` (megatron-core's own
`safe_globals.py` lists what it pickles). A stand-in only records the value it was built with; building it runs
nothing. Any other global is refused, naming the class and `--trust-pickle` (which falls back to
`weights_only=False`: only for files whose origin you trust).
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import signal
import types
from typing import Any

import numpy as np
import torch

from .common import ConversionError

# Megatron classes that its args and optimizer state can hold (megatron-core 0.16.1: megatron/core/safe_globals.py,
# enums.py, transformer/enums.py, rerun_state_machine.py); each becomes a MegatronStandIn.
MEGATRON_CLASSES = (
    "megatron.core.enums.ModelType",
    "megatron.core.enums.Fp8Recipe",
    "megatron.core.enums.Fp4Recipe",
    "megatron.core.transformer.enums.ModelType",
    "megatron.core.transformer.enums.LayerType",
    "megatron.core.transformer.enums.AttnType",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
    "megatron.core.optimizer.OptimizerConfig",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.model.enums.ModelType",
    "megatron.legacy.model.enums.AttnMaskType",
    "megatron.legacy.model.enums.LayerType",
    "megatron.legacy.model.enums.AttnType",
)


class MegatronStandIn:
    """An inert record of a pickled Megatron enum or config: the arguments it was built with and its state."""

    qualified_name = "megatron"

    def __new__(cls, *args):
        record = object.__new__(cls)
        record.args = args
        record.state = None
        return record

    def __setstate__(self, state) -> None:
        self.state = state

    @property
    def value(self):
        return self.args[0] if self.args else None

    def __repr__(self) -> str:
        return f"{self.qualified_name}({', '.join(map(repr, self.args))})"

    def __eq__(self, other) -> bool:
        return isinstance(other, MegatronStandIn) and (self.qualified_name, self.args) == (other.qualified_name,
                                                                                           other.args)

    def __hash__(self) -> int:
        return hash((self.qualified_name, self.args))


def _stand_in(qualified_name: str) -> type:
    return type(qualified_name.rsplit(".", 1)[1], (MegatronStandIn,), {"qualified_name": qualified_name})


def _allowed_globals() -> list:
    plain = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, io.BytesIO, signal.Signals,
             np.ndarray, np.dtype, np.core.multiarray._reconstruct]
    plain += [type(np.dtype(name)) for name in ("uint32", "float32", "int64", "float64")]
    return plain + [(_stand_in(name), name) for name in MEGATRON_CLASSES]


def _refused_global(error: Exception) -> str:
    """The class torch's weights_only unpickler refused, from its message."""
    text = str(error)
    for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
        if marker in text:
            return text.split(marker, 1)[1].split()[0]
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def load_megatron_file(path: str | os.PathLike, trust_pickle: bool = False, mmap: bool = True) -> Any:
    """The object pickled in a Megatron checkpoint file, tensors memory-mapped (read only when used)."""
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    # only what is not registered yet: leaving the context removes its globals, also ones another library
    # (megatron.core registers argparse.Namespace on import) had added for itself
    registered = torch.serialization.get_safe_globals()
    allowed = [entry for entry in _allowed_globals() if entry not in registered]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError:
        raise
    except Exception as error:
        if isinstance(error, RuntimeError) and "zip archive" in str(error) and mmap:
            # an old (pre-1.6, non-zip) torch file cannot be memory-mapped: read it whole
            return load_megatron_file(path, trust_pickle, mmap=False)
        raise ConversionError(
            f"{os.fspath(path)} refused: it references {_refused_global(error)}, which is not plain data nor a "
            "Megatron class megahf knows; unpickling it could run code. If you trust where the file comes from, "
            "pass --trust-pickle (trust_pickle=True) to load it anyway."
        ) from None


def arg(args: Any, name: str, default: Any = None) -> Any:
    """A field of Megatron's stored args (a Namespace, a dict, or a stand-in's state); a stand-in enum becomes its
    value."""
    if args is None:
        return default
    value = args.get(name, default) if isinstance(args, dict) else getattr(args, name, default)
    return value.value if isinstance(value, MegatronStandIn) else value


__all__ = ["MegatronStandIn", "arg", "load_megatron_file"]
