"""What every checkpoint format converts through: a megahf config and a lazy state in megahf's names.

A reader returns a `LoadedCheckpoint`: the megahf config, the megahf head class, and for each megahf parameter name a
`TensorRef` (shape, dtype, and how to produce the full tensor). Nothing is read until a writer asks for a tensor, and
a writer asks for one at a time, so a conversion holds one full tensor (plus the memory-mapped source files), never two
copies of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import MegahfError


class ConversionError(MegahfError, ValueError):
    """A checkpoint that cannot be converted as asked: the message names the file or key, the value and the fix."""


Block = tuple[slice, ...]  # one slice(start, stop) per dimension: a rectangular block of a tensor


@dataclass
class TensorRef:
    """A tensor not yet read: its shape and dtype, a function that returns it (full, on the CPU), and optionally one
    that returns only a block of it (`read`), so that a rank of a sharded model reads what it keeps and no more."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    load_block: Callable[[Block], torch.Tensor] | None = None

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorRef:
        return cls(tuple(tensor.shape), tensor.dtype, lambda: tensor)

    def read(self, block: Block) -> torch.Tensor:
        """The block of the tensor (`block` names every dimension), read alone where the source allows it (a
        safetensors slice), else cut out of the whole tensor."""
        if len(block) != len(self.shape) or any(s.step not in (None, 1) for s in block):
            raise ConversionError(f"block {block} does not name each of the {len(self.shape)} dimensions of a "
                                  f"{list(self.shape)} tensor with a plain slice (a caller bug)")
        if self.load_block is not None:
            part = self.load_block(block)
        else:
            part = self.load()[block].clone()  # a copy: the whole tensor is not kept alive by a view of it
        wanted = tuple(len(range(*s.indices(n))) for s, n in zip(block, self.shape))
        if tuple(part.shape) != wanted:
            raise ConversionError(f"block {block} of a {list(self.shape)} tensor came back as {list(part.shape)} "
                                  "(a converter bug)")
        return part

    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass
class LoadedCheckpoint:
    """A checkpoint read by a format's reader: `tensors` in the megahf head class's state-dict names (a tied output
    layer is left out, as transformers' save_pretrained leaves it out)."""

    config: object  # MegatronGPTConfig | MegatronBertConfig
    model_class: str  # "MegatronGPTForCausalLM", "MegatronBertForPreTraining", ...
    tensors: dict[str, TensorRef]
    layout: dict = field(default_factory=dict)  # what the source was: tp, pp, names, checkpoint_version, ...
    notes: list[str] = field(default_factory=list)  # what the reader assumed or dropped, for conversion.json

    def items(self) -> Iterator[tuple[str, TensorRef]]:
        return iter(self.tensors.items())

    def total_bytes(self) -> int:
        return sum(ref.nbytes() for ref in self.tensors.values())


def build_model(loaded: LoadedCheckpoint):
    """The megahf model holding the checkpoint's tensors (every tensor read: for the proof, not for converting).
    Built on the meta device (no random init of a model about to be overwritten), then given the tensors."""
    import megahf

    model_class = getattr(megahf, loaded.model_class)
    with torch.device("meta"):
        model = model_class(loaded.config)
    state = {name: ref.load() for name, ref in loaded.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"output_layer.weight"} if loaded.config.tie_word_embeddings else set()
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ConversionError(f"the converted tensors do not fit {loaded.model_class}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.tie_weights()
    for name, module in list(model.named_modules()):  # RoPE holds no weights, only buffers computed from the config
        if name and hasattr(module, "original_inv_freq"):
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, type(module)(loaded.config))
    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:
        raise ConversionError(f"{loaded.model_class}: no value for {leftover[:5]} (a converter bug)")
    return model.eval()


def check_shapes(loaded: LoadedCheckpoint, source: str) -> None:
    """Every tensor has the shape the config gives its name, and no name is missing or extra: checked on the meta
    device before anything is read or written."""
    import megahf

    with torch.device("meta"):
        model = getattr(megahf, loaded.model_class)(loaded.config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if loaded.config.tie_word_embeddings:
        expected.pop("output_layer.weight", None)
    for name, ref in loaded.items():
        if name not in expected:
            raise ConversionError(f"{source}: the tensor {name!r} has no place in {loaded.model_class} with this "
                                  "config; check the checkpoint's args or --model-overrides")
        if tuple(ref.shape) != expected[name]:
            raise ConversionError(f"{source}: {name} has shape {list(ref.shape)} but the config gives "
                                  f"{list(expected[name])}; fix the config with --model-overrides (e.g. hidden_size, "
                                  "ffn_hidden_size, num_query_groups, vocab_size)")
    missing = sorted(set(expected) - set(loaded.tensors))
    if missing:
        raise ConversionError(f"{source}: missing tensors for {loaded.model_class}: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="tensor", disable=not enabled, leave=False)


__all__ = ["Block", "ConversionError", "LoadedCheckpoint", "TensorRef", "build_model", "check_shapes", "progress"]
