"""`hf-bert` and `hf-megatron-bert` folders (transformers' `Bert*` / `MegatronBert*` save_pretrained output) as a
conversion format, with the names and layouts of `hf_bert.py`: read tensor by tensor on demand, written through the
in-memory converter (BERT checkpoints are small enough to hold)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .common import ConversionError, LoadedCheckpoint, build_model, check_shapes, progress
from .safetensors_stream import read_safetensors
from .tensor_parts import grouped_qkv, padded_rows

FAMILY = {"hf-bert": ("bert", "Bert"), "hf-megatron-bert": ("megatron-bert", "MegatronBert")}


def _hf_class(path: Path, fmt: str):
    import transformers

    model_type, family = FAMILY[fmt]
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    if config is None:
        raise ConversionError(f"{path}: no config.json (a transformers model folder written by save_pretrained)")
    if config.get("model_type") != model_type:
        raise ConversionError(f"{path}: model_type={config.get('model_type')!r}, expected {model_type!r} for {fmt}")
    name = (config.get("architectures") or [family + "ForPreTraining"])[0]
    if not name.startswith(family) or not hasattr(transformers, name):
        raise ConversionError(f"{path}: architectures={config.get('architectures')}: expected a {family}* class")
    return getattr(transformers, name)


def read_hf_bert(path: str | os.PathLike, fmt: str, overrides: dict | None = None) -> LoadedCheckpoint:
    """The folder's tensors in megahf's names, read on demand (the fused QKV and the padded vocabulary readable in
    blocks: a sharded run reads its own rows only)."""
    from transformers import AutoConfig

    from .hf_bert import HEADS, config_from_transformers, state_dict_from_transformers

    path = Path(path)
    hf_class = _hf_class(path, fmt)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{path}: no .safetensors weights (pickled .bin weights are not read)")
    unknown = set(overrides or {}) - {"vocab_size"}
    if unknown:
        raise ConversionError(f"--model-overrides {sorted(unknown)}: only vocab_size applies to {fmt} (the rest is "
                              "the transformers config)")
    hf_config = AutoConfig.from_pretrained(path)
    vocab = (overrides or {}).get("vocab_size") or getattr(hf_config, "megahf_vocab_size", None)
    try:
        config = config_from_transformers(hf_config, vocab_size=vocab)
        tensors = state_dict_from_transformers(
            read_safetensors(files), config, hf_class.__name__,
            fuse=lambda q, k, v: grouped_qkv(q, k, v, config.num_attention_heads),
            pad=lambda ref: padded_rows(ref, config.padded_vocab_size))
    except ValueError as error:
        raise ConversionError(f"{path}: {error}") from None
    suffix = hf_class.__name__.removeprefix(FAMILY[fmt][1])
    loaded = LoadedCheckpoint(config, HEADS[suffix], tensors)
    _drop_other_heads(loaded)
    check_shapes(loaded, str(path))
    return loaded


# modules a BERT head class may lack although the file holds them (bert-base-uncased's BertForMaskedLM file keeps the
# pooler and the next-sentence head of the pretraining it came from)
OPTIONAL_HEADS = ("model.pooler.", "binary_head.", "lm_head.", "output_layer.", "classification_head.",
                  "multichoice_head.", "qa_outputs.")


def _drop_other_heads(loaded: LoadedCheckpoint) -> None:
    """Leave out the tensors of heads the folder's class does not have, as transformers' from_pretrained does."""
    import torch

    import megahf

    with torch.device("meta"):
        names = set(getattr(megahf, loaded.model_class)(loaded.config).state_dict())
    dropped = sorted(name for name in loaded.tensors if name not in names and name.startswith(OPTIONAL_HEADS))
    for name in dropped:
        del loaded.tensors[name]
    if dropped:
        heads = sorted({name.rsplit(".", 2)[0] for name in dropped})
        loaded.notes.append(f"the folder's tensors of {', '.join(heads)} are not part of {loaded.model_class}: "
                            "left out")


def write_hf_bert(loaded: LoadedCheckpoint, dst: Path, fmt: str, show_progress: bool = True) -> None:
    from .hf_bert import to_transformers

    if loaded.config.model_type != "megatron_bert":
        raise ConversionError(f"this model cannot be written as {fmt}: it is not a BERT")
    wanted = "pre" if fmt == "hf-megatron-bert" else "post"
    if loaded.config.layernorm_order != wanted:
        other = "hf-megatron-bert" if wanted == "post" else "hf-bert"
        raise ConversionError(f"this BERT is {loaded.config.layernorm_order}-LayerNorm; {fmt} holds {wanted}-LN "
                              f"models: write it as {other}")
    bar = progress(1, fmt, show_progress)
    hf_model = to_transformers(build_model(loaded))
    hf_model.config.megahf_vocab_size = loaded.config.vocab_size
    dst.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(dst, safe_serialization=True)
    bar.update(1)
    bar.close()


__all__ = ["read_hf_bert", "write_hf_bert"]
