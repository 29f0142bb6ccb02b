"""Where a pretraining run's model comes from: a preset, initialised from the seed, or a checkpoint whose pretraining
continues.

Continued pretraining is Megatron-LM's `--load CKPT --finetune`: the weights are loaded, the optimizer, the learning
rate schedule and the step count start afresh. `model:` names the checkpoint:

* a megahf model folder (a `megahf pretrain` run's final/, or what `megahf convert --to megahf` wrote);
* a transformers GPT-2, Llama, BERT or MegatronBert folder (`save_pretrained` output, safetensors), converted in
  memory by `megahf convert`'s own readers;
* the Hub id of one of those (downloaded once into the Hugging Face cache).

A Megatron-LM, Megatron-Core torch_dist or nanotron checkpoint is converted first (the error gives the command). The
weights go straight into the run's layout (`megahf.parallel.load_shards`: each rank reads its shards only). The
checkpoint's architecture is kept: `model_overrides` may change only what continued pretraining changes
(`CONTINUED_OVERRIDES`: dropout, and for a context extension of a RoPE model the sequence length and RoPE's base);
recompute and the chunked loss are recipe keys of their own.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..convert.common import ConversionError, LoadedCheckpoint
from ..convert.detect import LOADABLE, convert_first, detect_format, read_model_folder
from ..models.presets import preset_family
from ..recipe import ModelRecipe, RecipeError

# model_overrides a checkpoint takes, and why continued pretraining may change each
CONTINUED_OVERRIDES = {
    "hidden_dropout": "dropout",
    "attention_dropout": "dropout",
    "max_position_embeddings": "the context length of a RoPE model (a context extension)",
    "rope_parameters": "RoPE's scaling for a context extension, e.g. {rope_type: yarn, factor: 4.0, "
                       "original_max_position_embeddings: 1024}",
    "rotary_base": "RoPE's base (theta), raised for a context extension",
}
# the head classes pretraining continues -> family; a BERT without its sentence-order head continues as masked LM
PRETRAINING_HEADS = {"MegatronGPTForCausalLM": "gpt", "MegatronBertForPreTraining": "bert",
                     "MegatronBertForMaskedLM": "bert"}
FAMILY_OF_MODEL_TYPE = {"megatron_gpt": "gpt", "gpt2": "gpt", "llama": "gpt", "megatron_bert": "bert", "bert": "bert",
                        "megatron-bert": "bert"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
# what a Hub download of a checkpoint fetches: the config, the weights, the tokenizer (never pickles)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


@functools.lru_cache(maxsize=None)
def checkpoint_path(name: str) -> Path:
    """The local folder of a checkpoint: the folder itself, or a Hub id's snapshot in the Hugging Face cache."""
    if os.path.isdir(name):
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # offline, unknown repo, no access: huggingface_hub raises many kinds
        raise RecipeError(
            f"recipe key model={name!r} is not a local folder, and the Hub id cannot be fetched "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); download it first "
            f"(hf download {name} --local-dir DIR) and give model: DIR"
        ) from None


def _format_of(model: ModelRecipe) -> str:
    path = checkpoint_path(model.model)
    try:
        fmt = detect_format(path)
    except ConversionError as error:
        raise RecipeError(f"recipe key model={model.model!r}: {error}") from None
    if fmt not in LOADABLE:
        raise RecipeError(str(convert_first(path, fmt, "model")))
    return fmt


def model_family(model: ModelRecipe) -> str:
    """"gpt" or "bert": the preset's family, or the checkpoint's (from its config.json alone)."""
    if model.is_preset:
        return preset_family(model.model)
    _format_of(model)
    config = json.loads((checkpoint_path(model.model) / "config.json").read_text(encoding="utf-8"))
    return FAMILY_OF_MODEL_TYPE[config["model_type"]]


def read_checkpoint_model(model: ModelRecipe) -> LoadedCheckpoint:
    """The checkpoint's config (with the allowed `model_overrides`) and its tensors, read on demand."""
    fmt = _format_of(model)
    try:
        loaded = read_model_folder(checkpoint_path(model.model))
    except ConversionError as error:
        raise RecipeError(f"recipe key model={model.model!r} ({fmt}): {error}") from None
    if loaded.model_class not in PRETRAINING_HEADS:
        raise RecipeError(
            f"recipe key model={model.model!r} is a {loaded.model_class}: pretraining continues a causal LM "
            "(MegatronGPTForCausalLM, GPT2LMHeadModel, LlamaForCausalLM) or a BERT with its masked-LM head "
            "(*ForPreTraining, *ForMaskedLM); give such a folder"
        )
    config = loaded.config
    if loaded.model_class == "MegatronBertForMaskedLM":
        config.add_binary_head = False  # no sentence-order head to continue: masked LM only
    if model.model_overrides:
        loaded.config = _with_overrides(model, config)
    loaded.layout["format"] = fmt
    return loaded


def _with_overrides(model: ModelRecipe, config):
    """The checkpoint's config with the `model_overrides` continued pretraining allows, rebuilt by its class (which
    standardizes and checks RoPE's parameters as for any model)."""
    overrides = dict(model.model_overrides)
    for key, value in overrides.items():
        if key not in CONTINUED_OVERRIDES:
            raise RecipeError(
                f"model_overrides.{key}={value!r} would change the architecture of the checkpoint model="
                f"{model.model!r}, which continued pretraining keeps; remove it (model_overrides of a checkpoint: "
                + ", ".join(f"{k} ({why})" for k, why in CONTINUED_OVERRIDES.items()) + ")"
            )
    rope = getattr(config, "rope_parameters", None)
    learned = ("rope_parameters", "rotary_base", "max_position_embeddings") if _learned_positions(config) else ()
    for key in learned:
        unchanged = key == "max_position_embeddings" and overrides.get(key) == config.max_position_embeddings
        if key not in overrides or unchanged:
            continue
        what = (f"its {config.max_position_embeddings} positions are a learned table, which continued pretraining "
                "cannot extend" if key == "max_position_embeddings" else "it has learned positions, no RoPE")
        raise RecipeError(f"model_overrides.{key}={overrides[key]!r} cannot apply to model={model.model!r}: {what}; "
                          "remove it (longer contexts need a RoPE model, e.g. a Llama)")
    if "rope_parameters" in overrides or "rotary_base" in overrides:
        scaling = overrides.pop("rope_parameters", None) or {}
        if not isinstance(scaling, dict):
            raise RecipeError(f"model_overrides.rope_parameters={scaling!r} must be a mapping, e.g. {{rope_type: yarn, "
                              "factor: 4.0, original_max_position_embeddings: 1024}")
        # a scaling keeps the checkpoint's base unless it names one (or rotary_base does)
        base = overrides.pop("rotary_base", scaling.get("rope_theta", rope["rope_theta"]))
        overrides["rope_parameters"] = {**({} if scaling else rope), **scaling, "rope_theta": base}
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
    try:
        return type(config)(**{**fields, **overrides})
    except (TypeError, ValueError) as error:
        raise RecipeError(f"model={model.model!r} with model_overrides={model.model_overrides}: {error}") from None


def _learned_positions(config) -> bool:
    return getattr(config, "position_embedding_type", "learned_absolute") == "learned_absolute"  # BERT: always


def check_sequence_length(model: ModelRecipe, config, seq_length: int) -> None:
    """A checkpoint with a table of learned positions (GPT-2, BERT) cannot take a longer sequence than it holds."""
    if _learned_positions(config) and seq_length > config.max_position_embeddings:
        raise RecipeError(
            f"recipe key seq_length={seq_length} exceeds the {config.max_position_embeddings} positions model="
            f"{model.model!r} learned (a table of learned positions, which continued pretraining cannot extend); set "
            f"seq_length to at most {config.max_position_embeddings}, or continue a RoPE model (e.g. a Llama) for "
            "longer contexts"
        )


def checkpoint_tokenizer_path(model: ModelRecipe) -> Path | None:
    """The checkpoint's folder when it holds tokenizer files, else None."""
    path = checkpoint_path(model.model)
    return path if any((path / name).is_file() for name in TOKENIZER_FILES) else None


__all__ = ["CONTINUED_OVERRIDES", "FAMILY_OF_MODEL_TYPE", "PRETRAINING_HEADS", "check_sequence_length",
           "checkpoint_path", "checkpoint_tokenizer_path", "model_family", "read_checkpoint_model"]
