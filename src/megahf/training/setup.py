"""From a parsed recipe to what a run is made of: the model config, the parallel layout, the tokenizer, the model;
and the recipe checks that need the model config (tokenizer family, tensor-parallel fit, sequence length).

    recipe = load_recipe("recipes/gpt/tiny.yaml", ["--train_steps", "50"])   # parsed and fully checked
    layout = build_layout(recipe, world_size=2)
"""

from __future__ import annotations

import dataclasses
import os

import torch
from transformers import AutoTokenizer

from ..assets import embedded_tokenizer_path
from ..models.bert import MegatronBertConfig
from ..models.gpt import MegatronGPTConfig
from ..models.presets import preset_family
from ..parallel import distribute_model
from ..parallel.layout import LayoutError, ParallelLayout, resolve_layout
from ..parallel.rng import checkpoint_context
from ..recipe import ModelRecipe, PretrainRecipe, RecipeError, parse_recipe
from ..recipe.data import EMBEDDED_BERT_TOKENIZER, EMBEDDED_TOKENIZER, GPT2_TOKENIZER_NAMES
from ..recipe.errors import did_you_mean
from .compile import compile_layers
from .families import family_of


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PretrainRecipe:
    """Read a pretraining recipe, apply `--key value` overrides and check it completely (`RecipeError` names the
    key, the value and the fix). `path=None` starts from the defaults."""
    recipe = parse_recipe(PretrainRecipe, path, overrides)
    check_recipe(recipe)
    return recipe


def config_class_of(model: ModelRecipe) -> type:
    return MegatronBertConfig if preset_family(model.model) == "bert" else MegatronGPTConfig


def build_config(model: ModelRecipe):
    """The model's `MegatronGPTConfig` or `MegatronBertConfig` (no weights); `RecipeError` for an unknown field."""
    config_class = config_class_of(model)
    known = _config_keys(config_class)
    for key in model.model_overrides:
        if key not in known:
            raise RecipeError(
                f"unknown model field model_overrides.{key}={model.model_overrides[key]!r}"
                f"{did_you_mean(key, known, prefix='model_overrides.')} (model_overrides takes "
                f"{config_class.__name__} fields)"
            )
    if "loss_chunk_size" in model.model_overrides:
        raise RecipeError(
            f"model_overrides.loss_chunk_size={model.model_overrides['loss_chunk_size']!r}: the chunked loss is "
            "set by the recipe key loss_chunk_size; move it there"
        )
    runtime = {"loss_chunk_size": model.loss_chunk_size}
    if model.recompute == "selective":
        runtime["recompute_granularity"] = "selective"
    try:
        return config_class.from_preset(model.model, **model.model_overrides, **runtime)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"model={model.model!r} with model_overrides={model.model_overrides}: {error}") from None


def check_recipe(recipe: PretrainRecipe) -> None:
    """Every section's checks, then those across sections that need the model config."""
    recipe.validate()
    config = build_config(recipe.model)
    tokenizer, model = recipe.data.tokenizer, recipe.model.model
    if isinstance(config, MegatronBertConfig) and tokenizer in GPT2_TOKENIZER_NAMES:
        raise RecipeError(
            f"recipe key tokenizer={tokenizer!r} does not fit model={model!r}: BERT needs a WordPiece "
            f"tokenizer with [CLS], [SEP], [MASK] and [PAD]; use '{EMBEDDED_BERT_TOKENIZER}' (shipped) or a "
            "tokenizer folder"
        )
    tp = recipe.parallel.tensor_parallel_size
    try:
        config.check_tensor_parallel(tp)
    except ValueError as error:
        raise RecipeError(
            f"recipe key tensor_parallel_size={tp} does not fit model={model!r}: "
            f"{error}".replace("tp_size=", "tensor_parallel_size=")
        ) from None
    learned = getattr(config, "position_embedding_type", "learned_absolute") == "learned_absolute"  # BERT: always
    seq_length = recipe.data.seq_length
    if recipe.parallel.sequence_parallel:
        if seq_length % tp:
            raise RecipeError(
                f"recipe key seq_length={seq_length} is not divisible by tensor_parallel_size={tp}, which "
                f"sequence_parallel splits it over; use a multiple of {tp} (e.g. {seq_length - seq_length % tp})"
            )
        if getattr(config, "layernorm_order", "pre") != "pre":
            raise RecipeError(
                f"recipe key sequence_parallel=True needs the pre-LayerNorm order, but model={model!r} has "
                f"layernorm_order={config.layernorm_order!r}; set model_overrides.layernorm_order: pre or "
                "sequence_parallel: false"
            )
    if learned and seq_length > config.max_position_embeddings:
        raise RecipeError(
            f"recipe key seq_length={seq_length} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}; lower seq_length or set model_overrides.max_position_embeddings"
        )


def build_layout(recipe: PretrainRecipe, world_size: int | None = None) -> ParallelLayout:
    """The parallel layout for `world_size` processes (default: $WORLD_SIZE, 1 without a launcher), with the
    gradient accumulation derived; `RecipeError` naming the key when the sizes do not fit."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    p = recipe.parallel
    try:
        return resolve_layout(
            world_size=world_size, tensor_parallel_size=p.tensor_parallel_size, fsdp_size=p.fsdp_size,
            data_parallel_size=p.data_parallel_size, micro_batch_size=p.micro_batch_size,
            gradient_accumulation_steps=p.gradient_accumulation_steps, global_batch_size=p.global_batch_size,
            sequence_parallel=p.sequence_parallel,
        )
    except LayoutError as error:
        raise RecipeError(f"recipe layout: {error}") from None


def load_tokenizer(recipe: PretrainRecipe):
    """The recipe's tokenizer: one shipped with megahf (GPT-2 BPE, BERT WordPiece) by name, or
    `AutoTokenizer.from_pretrained(tokenizer)`."""
    name = recipe.data.tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_path(name) or name)
    except (OSError, ValueError) as error:
        raise RecipeError(
            f"recipe key tokenizer={name!r} cannot be loaded ({str(error).splitlines()[0]}); give a "
            f"local tokenizer folder or '{EMBEDDED_TOKENIZER}' / '{EMBEDDED_BERT_TOKENIZER}'"
        ) from None
    if preset_family(recipe.model.model) == "gpt" and tokenizer.eos_token_id is None:
        raise RecipeError(
            f"tokenizer={name!r} has no eos token, which marks the end of each document; "
            "use a tokenizer with an eos token"
        )
    return tokenizer


def build_model(recipe: PretrainRecipe, tokenizer, layout: ParallelLayout | None = None):
    """A freshly initialized model of the recipe's shape, its vocabulary sized to the tokenizer, sharded as the
    layout says (tensor parallel and/or FSDP2 through transformers' DistributedConfig). Every rank initialises the
    full model from the recipe's seed, so each keeps its slice of the same model as one process would build."""
    vocab = len(tokenizer)
    wanted = recipe.model.model_overrides.get("vocab_size")
    if wanted is not None and wanted < vocab:
        raise RecipeError(
            f"model_overrides.vocab_size={wanted} is smaller than the tokenizer's {vocab} tokens; "
            f"remove it or set it to at least {vocab}"
        )
    config = build_config(recipe.model)
    if wanted is None:
        config.vocab_size = vocab
    family = family_of(recipe)
    if family.name == "gpt":
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    else:
        config.pad_token_id = tokenizer.pad_token_id
    config.check()
    tp = layout.tensor_parallel_size if layout else 1
    try:
        config.check_tensor_parallel(tp)
    except ValueError as error:  # the tokenizer's vocabulary sets the padded size
        raise RecipeError(f"tensor_parallel_size={tp} with tokenizer={recipe.data.tokenizer!r}: {error}") from None
    torch.manual_seed(recipe.run.seed)
    model = family.model_class(config)
    if family.name == "gpt":
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = config.bos_token_id
    if layout is not None and layout.sharded:
        model = distribute_model(model, layout.distributed_config())
    if recipe.model.recompute == "full":
        # Non-reentrant, with the model-parallel RNG stream put back for the recomputation (the same dropout masks).
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context})
    if recipe.model.compile:
        compile_layers(model)
    return model


def _config_keys(config_class) -> set[str]:
    """The constructor fields of a (dataclass) config plus the transformers aliases of its attribute map."""
    keys = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "attribute_map", {}))
    return keys - {"transformers_version", "architectures"}


__all__ = ["build_config", "build_layout", "build_model", "check_recipe", "config_class_of", "load_recipe",
           "load_tokenizer"]
