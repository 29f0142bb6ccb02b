"""From a parsed recipe to what a run is made of: the model config, the parallel layout, the tokenizer, the model
(a preset initialised from the seed, or a checkpoint loaded into the layout: `model_source`); and the recipe checks
that need the model config (tokenizer family, tensor-parallel fit, sequence length) or the tokenizer (the data's and
the checkpoint's tokenizer).

    recipe = load_recipe("recipes/gpt/tiny.yaml", ["--train_steps", "50"])   # parsed and fully checked
    layout = build_layout(recipe, world_size=2)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..assets import embedded_tokenizer_path
from ..data.tokenizer_record import TokenizerRecordError, describe, read_tokenizer_record, same_tokenizer, \
    tokenizer_identity
from ..models.bert import MegatronBertConfig, MegatronBertPreTrainedModel
from ..models.gpt import MegatronGPTConfig, MegatronGPTPreTrainedModel
from ..parallel import distribute_model
from ..parallel.launch_config import launch_fsdp_size, read_fsdp_launch
from ..parallel.layout import LayoutError, ParallelLayout, resolve_layout
from ..parallel.load_shards import load_into_layout
from ..parallel.pipeline import ZERO_BUBBLE, build_pipeline
from ..parallel.rng import checkpoint_context
from ..recipe import FinetuneRecipe, ModelRecipe, PretrainRecipe, RecipeError, parse_recipe
from ..recipe.data import EMBEDDED_BERT_TOKENIZER, EMBEDDED_TOKENIZER, GPT2_TOKENIZER_NAMES
from ..recipe.errors import did_you_mean
from .compile import compile_layers
from .families import family_of
from .log import say
from .model_source import check_sequence_length, checkpoint_tokenizer_path, model_family, read_checkpoint_model


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PretrainRecipe:
    """Read a pretraining recipe, apply `--key value` overrides and check it completely (`RecipeError` names the
    key, the value and the fix). `path=None` starts from the defaults."""
    recipe = parse_recipe(PretrainRecipe, path, overrides)
    check_recipe(recipe)
    return recipe


def config_class_of(model: ModelRecipe) -> type:
    return MegatronBertConfig if model_family(model) == "bert" else MegatronGPTConfig


def _runtime_fields(model: ModelRecipe) -> dict:
    """Config fields the recipe sets by keys of its own (how the model runs, not what it is)."""
    runtime = {"loss_chunk_size": model.loss_chunk_size}
    if model.recompute == "selective":
        runtime["recompute_granularity"] = "selective"
    return runtime


def build_config(model: ModelRecipe):
    """The model's `MegatronGPTConfig` or `MegatronBertConfig` (no weights): the preset's with `model_overrides`, or
    the checkpoint's with the overrides continued pretraining allows; `RecipeError` for a field it refuses."""
    if "loss_chunk_size" in model.model_overrides:
        raise RecipeError(
            f"model_overrides.loss_chunk_size={model.model_overrides['loss_chunk_size']!r}: the chunked loss is "
            "set by the recipe key loss_chunk_size; move it there"
        )
    if not model.is_preset:
        config = read_checkpoint_model(model).config
        for key, value in _runtime_fields(model).items():
            setattr(config, key, value)
        return config
    config_class = config_class_of(model)
    known = _config_keys(config_class)
    for key in model.model_overrides:
        if key not in known:
            raise RecipeError(
                f"unknown model field model_overrides.{key}={model.model_overrides[key]!r}"
                f"{did_you_mean(key, known, prefix='model_overrides.')} (model_overrides takes "
                f"{config_class.__name__} fields)"
            )
    runtime = _runtime_fields(model)
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
    check_pipeline(recipe, config)
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
                f"layernorm_order={config.layernorm_order!r}; set "
                + ("model_overrides.layernorm_order: pre or " if recipe.model.is_preset else "")
                + "sequence_parallel: false"
            )
    if not recipe.model.is_preset:
        check_sequence_length(recipe.model, config, seq_length)
    elif learned and seq_length > config.max_position_embeddings:
        raise RecipeError(
            f"recipe key seq_length={seq_length} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}; lower seq_length or set model_overrides.max_position_embeddings"
        )


def check_pipeline(recipe: PretrainRecipe, config) -> None:
    """A pipelined layout splits a GPT's layers evenly over pipeline_parallel_size x virtual_pipeline_size stages;
    BERT is not pipelined (its pretraining heads take the first token's and every masked token's states, and the
    model is small enough for tensor parallelism x FSDP alone)."""
    p = recipe.parallel
    if p.pipeline_parallel_size == 1:
        return
    if isinstance(config, MegatronBertConfig):
        raise RecipeError(
            f"recipe key pipeline_parallel_size={p.pipeline_parallel_size}: megahf pipelines GPT models only, and "
            f"model={recipe.model.model!r} is a BERT; set pipeline_parallel_size: 1 and use tensor_parallel_size "
            "and fsdp_size (Megatron's BERTs up to 3.9B fit them)"
        )
    stages = p.pipeline_parallel_size * p.virtual_pipeline_size
    if config.num_layers % stages:
        raise RecipeError(
            f"recipe key pipeline_parallel_size={p.pipeline_parallel_size} x virtual_pipeline_size="
            f"{p.virtual_pipeline_size} = {stages} stages do not divide the model's num_layers={config.num_layers}; "
            f"use sizes whose product divides {config.num_layers}"
        )
    if recipe.model.compile:
        raise RecipeError("recipe key compile=True: megahf does not compile a pipelined model yet; set compile: "
                          "false, or pipeline_parallel_size: 1")


def build_layout(recipe: PretrainRecipe | FinetuneRecipe, world_size: int | None = None) -> ParallelLayout:
    """The parallel layout for `world_size` processes (default: $WORLD_SIZE, 1 without a launcher), with the FSDP
    size an accelerate launch config of `distributed_type: FSDP` asks for where the recipe's fsdp_size is 0
    (`megahf.parallel.launch_config`) and the gradient accumulation derived; `RecipeError` naming the key (and the
    launch config's option) when the sizes do not fit."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    p = recipe.parallel
    try:
        launch = read_fsdp_launch(os.environ, LAYER_CLASSES)
        fsdp_size = launch_fsdp_size(launch, p.fsdp_size, world_size, p.tensor_parallel_size,
                                     int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), p.pipeline_parallel_size)
        if launch is not None and launch.activation_checkpointing:
            check_activation_checkpointing(recipe)
        return resolve_layout(
            world_size=world_size, tensor_parallel_size=p.tensor_parallel_size, fsdp_size=fsdp_size,
            data_parallel_size=p.data_parallel_size, micro_batch_size=p.micro_batch_size,
            gradient_accumulation_steps=p.gradient_accumulation_steps, global_batch_size=p.global_batch_size,
            sequence_parallel=p.sequence_parallel, pipeline_parallel_size=p.pipeline_parallel_size,
            virtual_pipeline_size=p.virtual_pipeline_size, pipeline_schedule=p.pipeline_schedule,
        )
    except LayoutError as error:
        raise RecipeError(f"recipe layout: {error}") from None


# The transformer layer classes megahf's FSDP plans wrap, one unit each (what TRANSFORMER_BASED_WRAP may name).
LAYER_CLASSES = (*MegatronGPTPreTrainedModel._no_split_modules, *MegatronBertPreTrainedModel._no_split_modules)


def check_activation_checkpointing(recipe: PretrainRecipe | FinetuneRecipe) -> None:
    """A launch config's fsdp_activation_checkpointing: true is honoured by the recipe's recompute, never silently
    dropped."""
    recompute = recipe.model.recompute if isinstance(recipe, PretrainRecipe) else None
    if recompute is None:
        raise LayoutError("the launch config's fsdp_activation_checkpointing: true (FSDP_ACTIVATION_CHECKPOINTING): "
                          "megahf finetune does not recompute activations; set fsdp_activation_checkpointing: false")
    if recompute == "none":
        raise LayoutError("the launch config's fsdp_activation_checkpointing: true (FSDP_ACTIVATION_CHECKPOINTING) "
                          "contradicts recipe key recompute='none'; set recompute: full (every layer recomputed from "
                          "its input, what that option does) or selective, or fsdp_activation_checkpointing: false")


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
    if model_family(recipe.model) == "gpt" and tokenizer.eos_token_id is None:
        raise RecipeError(
            f"tokenizer={name!r} has no eos token, which marks the end of each document; "
            "use a tokenizer with an eos token"
        )
    check_tokenizer(recipe, tokenizer)
    return tokenizer


def check_tokenizer(recipe: PretrainRecipe, tokenizer) -> None:
    """The run's tokenizer is the one the indexed data was tokenized with (as recorded beside it) and, for a
    checkpoint, the one saved with it, and its ids fit the checkpoint's vocabulary; refused before any compute."""
    name = recipe.data.tokenizer
    identity = functools.cache(lambda: tokenizer_identity(tokenizer, name))  # hashing a vocabulary takes a moment
    for prefix in recipe.data.indexed_prefixes:
        try:
            recorded = read_tokenizer_record(prefix)
        except TokenizerRecordError as error:
            raise RecipeError(f"recipe key data_path={recipe.data.data_path!r}: {error}") from None
        if recorded is None:
            say(f"WARNING: {prefix}.bin has no tokenizer record (tokenized by an older megahf or by Megatron's "
                f"tool): cannot check that tokenizer={name!r} made it; run megahf preprocess again to record it")
        elif not same_tokenizer(recorded, identity()):
            raise RecipeError(
                f"recipe key data_path={recipe.data.data_path!r}: {prefix} was tokenized with {describe(recorded)}, "
                f"but the run's tokenizer is {describe(identity())}; set tokenizer: {recorded['name']} (or the "
                "tokenizer folder it names), or tokenize the corpus again with megahf preprocess --tokenizer "
                f"{name}"
            )
    if recipe.model.is_preset:
        return
    config = build_config(recipe.model)
    if len(tokenizer) > config.vocab_size:
        raise RecipeError(
            f"recipe key tokenizer={name!r} has {len(tokenizer):,} tokens but model={recipe.model.model!r} has a "
            f"vocabulary of {config.vocab_size:,}: its ids would index past the embeddings; use the tokenizer the "
            "model was trained with"
        )
    own_path = checkpoint_tokenizer_path(recipe.model)
    if own_path is None:
        say(f"WARNING: model={recipe.model.model!r} holds no tokenizer: cannot check that tokenizer={name!r} is "
            "the one it was trained with")
        return
    if os.path.isdir(name) and Path(name).resolve() == own_path.resolve():
        return  # the checkpoint's own tokenizer
    try:
        own = AutoTokenizer.from_pretrained(own_path)
    except (OSError, ValueError) as error:
        raise RecipeError(f"recipe key model={recipe.model.model!r}: its tokenizer files cannot be loaded "
                          f"({str(error).splitlines()[0]}); remove them or repair them") from None
    own_identity = tokenizer_identity(own, recipe.model.model)
    if not same_tokenizer(own_identity, identity()):
        raise RecipeError(
            f"recipe key tokenizer={name!r} is {describe(identity())}, not the tokenizer saved with model="
            f"{recipe.model.model!r}, {describe(own_identity)}; set tokenizer: {recipe.model.model}"
        )


def build_model(recipe: PretrainRecipe, tokenizer, layout: ParallelLayout | None = None):
    """The recipe's model, sharded as the layout says (tensor parallel and/or FSDP2 through transformers'
    DistributedConfig; a pipelined layout keeps this rank's stages only, `parallel/pipeline.py`): a preset freshly
    initialised from the seed, its vocabulary sized to the tokenizer (every rank initialises the full model, so each
    keeps its slice of the same model as one process would build), or a checkpoint's weights, each rank reading only
    its shards (continued pretraining; a pipelined layout loads them whole, then keeps its stages')."""
    family = family_of(recipe)
    distributed = layout.distributed_config() if layout is not None and layout.sharded else None
    if recipe.model.is_preset:
        model = _initialised_model(recipe, tokenizer, layout, family, distributed)
    else:
        loaded = read_checkpoint_model(recipe.model)
        for key, value in _runtime_fields(recipe.model).items():
            setattr(loaded.config, key, value)
        torch.manual_seed(recipe.run.seed)  # the tensor-parallel dropout streams are seeded from it, as for a preset
        model = load_into_layout(family.model_class, loaded.config, loaded.tensors, distributed)
        say(f"continuing the pretraining of {recipe.model.model} ({loaded.layout['format']}): its weights loaded, "
            "each rank reading its own shards; the optimizer, the schedule and the step start afresh")
    if family.name == "gpt":
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = model.config.bos_token_id
    if recipe.model.recompute == "full":
        # Non-reentrant, with the model-parallel RNG stream put back for the recomputation (the same dropout masks).
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context})
    if recipe.model.compile:
        compile_layers(model)
    if layout is not None and layout.pipelined:
        if layout.pipeline_schedule in ZERO_BUBBLE and model.config.loss_chunk_size:
            say(f"pipeline_schedule={layout.pipeline_schedule}: the last stage computes its loss unchunked "
                f"(loss_chunk_size={model.config.loss_chunk_size} takes one backward pass, zero-bubble schedules two)")
        build_pipeline(model, layout, _device())
    return model


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _initialised_model(recipe: PretrainRecipe, tokenizer, layout: ParallelLayout | None, family, distributed):
    """A preset's model, its vocabulary sized to the tokenizer, initialised from the recipe's seed and sharded."""
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
    return distribute_model(model, distributed) if distributed is not None else model


def _config_keys(config_class) -> set[str]:
    """The constructor fields of a (dataclass) config plus the transformers aliases of its attribute map."""
    keys = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "attribute_map", {}))
    return keys - {"transformers_version", "architectures"}


__all__ = ["build_config", "build_layout", "build_model", "check_recipe", "check_tokenizer", "config_class_of",
           "load_recipe", "load_tokenizer"]
