"""Pretraining recipes: a YAML file parsed into a dataclass, every key overridable from the command line.

    recipe = load_recipe("recipes/gpt/tiny.yaml", ["--train_steps", "50", "--model_overrides.num_layers", "2"])

A recipe is checked completely before anything is computed or written: an unknown key, a value of the wrong type
or out of range, an unknown model preset or model field, a missing corpus file all raise `RecipeError` with a
message that names the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

EMBEDDED_TOKENIZER = "gpt2-embedded"
EMBEDDED_BERT_TOKENIZER = "bert-uncased-embedded"
GPT2_TOKENIZER_NAMES = (EMBEDDED_TOKENIZER, "gpt2", "embedded")
EMBEDDED_CORPUS = "embedded"
LR_SCHEDULES = ("cosine", "linear", "constant")
CORPUS_EXTENSIONS = (".jsonl", ".json", ".txt", ".parquet")
REPORT_TO = ("none", "tensorboard", "all")
RESUME_MODES = ("auto", "none")


class RecipeError(ValueError):
    """A recipe (or the data it points to) is unusable; the message says which key, which value and the fix."""


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class PretrainRecipe:
    """Everything one pretraining run needs. Field names follow Megatron-LM's arguments where one exists
    (`--seq-length`, `--micro-batch-size`, `--train-iters`, `--lr`, `--min-lr`, `--lr-warmup-iters`,
    `--lr-decay-style`, `--clip-grad`, `--eval-interval`, `--log-interval`)."""

    # ---- model
    model: str = _help("Model preset: gpt-tiny, gpt-345m, ..., llama-tiny, llama-1b, llama-8b (MegatronGPT), or "
                       "bert-tiny, bert-336m, bert-1.3b, bert-3.9b (MegatronBert: masked LM + sentence order).",
                       default="gpt-tiny")
    model_overrides: dict[str, Any] = _help(
        "MegatronGPTConfig / MegatronBertConfig fields that replace the preset's, e.g. {num_layers: 2}.",
        default_factory=dict,
    )
    # ---- data
    tokenizer: str = _help(
        f"'{EMBEDDED_TOKENIZER}' (GPT-2 BPE shipped with megahf), '{EMBEDDED_BERT_TOKENIZER}' (BERT WordPiece "
        "shipped with megahf), or a folder/name for AutoTokenizer.",
        default=EMBEDDED_TOKENIZER,
    )
    corpus: str = _help(
        f"'{EMBEDDED_CORPUS}' (Shakespeare scenes shipped with megahf), or a local "
        f"{'/'.join(CORPUS_EXTENSIONS)} file (.txt: documents separated by blank lines).",
        default=EMBEDDED_CORPUS,
    )
    text_key: str = _help("Field holding each document's text in a .jsonl/.json/.parquet corpus.", default="text")
    data_path: str = _help(
        "Megatron indexed data instead of `corpus` (Megatron's --data-path): one prefix written by "
        "`megahf preprocess` (e.g. data/my_text_document), or weights and prefixes to blend ('30 data/a 70 data/b').",
        default="",
    )
    split: str = _help("Train/valid/test shares of the documents of each data_path file (Megatron's --split).",
                       default="969,30,1")
    eval_iters: int = _help("Validation batches per evaluation (Megatron's --eval-iters) for GPT data_path and "
                            "BERT data.", default=10)
    data_cache_path: str = _help("Folder for the sample-index cache of data_path (default: beside the data).",
                                 default="")
    mask_prob: float = _help("BERT: share of the tokens masked for the masked LM (Megatron's --mask-prob).",
                             default=0.15)
    short_seq_prob: float = _help("BERT: chance of a shorter sample (Megatron's --short-seq-prob).", default=0.1)
    valid_fraction: float = _help("Fraction of the documents held out for validation (0 < f < 1).", default=0.05)
    seq_length: int = _help("Tokens per training sample (documents are packed, EOD-separated).", default=128)
    # ---- batch and length of training
    micro_batch_size: int = _help("Samples per data-parallel rank per forward pass.", default=8)
    gradient_accumulation_steps: int = _help(
        "Micro-batches accumulated into one optimizer step (0: derived from global_batch_size, else 1).", default=0)
    global_batch_size: int = _help(
        "Samples per optimizer step over all ranks = micro_batch_size x data-parallel size x gradient "
        "accumulation, checked at launch (0: whatever the other two give).", default=0)
    train_steps: int = _help("Optimizer steps (Megatron's --train-iters).", default=300)
    # ---- parallel layout (the launch config only says how many processes)
    tensor_parallel_size: int = _help("Tensor-parallel ranks per model replica (Megatron's --tensor-model-parallel-"
                                      "size); must divide the heads, query groups, FFN and padded vocabulary.",
                                      default=1)
    fsdp_size: int = _help("Data-parallel ranks over which FSDP2 shards parameters, gradients and optimizer state "
                           "(1: no sharding; must divide the data-parallel size).", default=1)
    data_parallel_size: int = _help("Ranks with distinct batches = world size / tensor_parallel_size, checked at "
                                    "launch (0: derived).", default=0)
    # ---- optimizer and learning-rate schedule
    learning_rate: float = _help("Peak learning rate after warmup.", default=1e-3)
    min_learning_rate: float = _help("Floor the schedule decays to (cosine and linear).", default=1e-4)
    warmup_steps: int = _help("Linear warmup from 0 to learning_rate over this many steps.", default=30)
    lr_schedule: str = _help(f"Decay after warmup: one of {', '.join(LR_SCHEDULES)}.", default="cosine")
    weight_decay: float = _help("AdamW weight decay (not applied to biases and norm weights).", default=0.1)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.95)
    adam_eps: float = _help("AdamW epsilon.", default=1e-8)
    clip_grad: float = _help("Clip the global gradient norm to this (0 turns clipping off).", default=1.0)
    seed: int = _help("Seed of the model init, the data split and order, dropout and sampling.", default=1234)
    # ---- evaluation, logging, output
    eval_interval: int = _help("Evaluate on the validation split every this many steps (0: only at the end).",
                               default=100)
    log_interval: int = _help("Print a log line every this many steps.", default=10)
    output_dir: str = _help("Folder for final/ (the model), metrics.json, loss.png, recipe.yaml.",
                            default="runs/gpt-tiny")
    sample_prompt: str = _help("Prompt of the sample generated at the end ('' starts from EOD).", default="ROMEO:")
    sample_tokens: int = _help("Tokens generated for the sample (0: no sample).", default=64)
    sample_top_k: int = _help("Top-k sampling for the sample, seeded (0: greedy).", default=40)
    num_workers: int = _help("DataLoader worker processes.", default=0)
    activation_checkpointing: bool = _help("Recompute activations in the backward pass to save memory.",
                                         default=False)
    report_to: str = _help(f"Experiment tracker for Trainer: one of {', '.join(REPORT_TO)}.", default="none")
    peak_tflops: float = _help("Peak TFLOP/s of one device for the MFU figure (0: a known GPU's bf16 dense peak, "
                               "or on CPU this machine's fp32 matmul rate measured at start-up).", default=0.0)
    # ---- checkpoints and resume
    save_interval: int = _help("Write a resumable checkpoint to output_dir/checkpoints/ every this many steps "
                               "(0: none; Megatron's --save-interval).", default=0)
    keep_last: int = _help("Complete checkpoints kept; older ones are deleted once a newer one is complete.",
                           default=2)
    resume: str = _help("'auto': continue from the newest complete checkpoint in output_dir/checkpoints if there "
                        "is one (running the same command again resumes); 'none': start afresh; or a checkpoint "
                        "folder.", default="auto")

    # ------------------------------------------------------------------ derived values

    def layout(self, world_size: int | None = None):
        """The parallel layout for `world_size` processes (default: $WORLD_SIZE, 1 without a launcher), with the
        gradient accumulation derived; raises `RecipeError` naming the key when the sizes do not fit."""
        from ..parallel.layout import LayoutError, resolve_layout

        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            return resolve_layout(
                world_size=world_size, tensor_parallel_size=self.tensor_parallel_size, fsdp_size=self.fsdp_size,
                data_parallel_size=self.data_parallel_size, micro_batch_size=self.micro_batch_size,
                gradient_accumulation_steps=self.gradient_accumulation_steps,
                global_batch_size=self.global_batch_size,
            )
        except LayoutError as error:
            raise RecipeError(f"recipe layout: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build_config(self):
        """The model's `MegatronGPTConfig` or `MegatronBertConfig` (no weights). Raises `RecipeError` for an
        unknown preset or field."""
        from ..models.bert import MegatronBertConfig
        from ..models.gpt import MegatronGPTConfig
        from ..models.presets import PRESETS, preset_family

        presets = [name for family in PRESETS.values() for name in family]
        if self.model not in presets:
            raise RecipeError(
                f"unknown model preset model={self.model!r}{_did_you_mean(self.model, presets)} "
                f"(known presets: {', '.join(presets)})"
            )
        config_class = MegatronBertConfig if preset_family(self.model) == "bert" else MegatronGPTConfig
        known = _config_keys(config_class)
        for key in self.model_overrides:
            if key not in known:
                raise RecipeError(
                    f"unknown model field model_overrides.{key}={self.model_overrides[key]!r}"
                    f"{_did_you_mean(key, known, prefix='model_overrides.')} (model_overrides takes "
                    f"{config_class.__name__} fields)"
                )
        try:
            return config_class.from_preset(self.model, **self.model_overrides)
        except (TypeError, ValueError) as error:
            raise RecipeError(f"model={self.model!r} with model_overrides={self.model_overrides}: {error}") from None

    @property
    def data_prefixes(self) -> list[str]:
        """The indexed-dataset prefixes named by data_path (weights dropped)."""
        from ..data import parse_blend

        return parse_blend(self.data_path.split())[0] if self.data_path.strip() else []

    # ------------------------------------------------------------------ checks

    def validate(self) -> None:
        """Check every value and that the model config builds; raise `RecipeError` on the first problem."""

        def need(ok: bool, key: str, rule: str) -> None:
            if not ok:
                raise RecipeError(f"recipe key {key}={getattr(self, key)!r} is invalid: {rule}")

        for key in ("seq_length", "micro_batch_size", "train_steps", "log_interval", "eval_iters",
                    "tensor_parallel_size", "fsdp_size", "keep_last"):
            need(getattr(self, key) >= 1, key, "it must be at least 1")
        for key in ("warmup_steps", "eval_interval", "sample_tokens", "sample_top_k", "num_workers", "seed",
                    "gradient_accumulation_steps", "global_batch_size", "data_parallel_size", "save_interval"):
            need(getattr(self, key) >= 0, key, "it must be 0 or more")
        need(math.isfinite(self.peak_tflops) and self.peak_tflops >= 0, "peak_tflops",
             "it must be 0 (auto) or the device's peak in TFLOP/s, e.g. 989 for an H100's bf16")
        need(self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
             f"it must be a multiple of micro_batch_size={self.micro_batch_size}")
        need(self.resume in RESUME_MODES or os.path.isdir(self.resume), "resume",
             "use 'auto', 'none' or an existing checkpoint folder (output_dir/checkpoints/step_NNNNNNN)")
        need(self.warmup_steps < self.train_steps, "warmup_steps",
             f"it must be smaller than train_steps={self.train_steps}")
        need(0.0 < self.mask_prob < 1.0, "mask_prob", "it must lie strictly between 0 and 1, e.g. 0.15")
        need(0.0 <= self.short_seq_prob <= 1.0, "short_seq_prob", "it must lie in [0, 1], e.g. 0.1")
        need(0.0 < self.valid_fraction < 1.0, "valid_fraction", "it must lie strictly between 0 and 1, e.g. 0.05")
        need(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate",
             "it must be positive, e.g. 1e-3")
        need(0.0 <= self.min_learning_rate <= self.learning_rate, "min_learning_rate",
             f"it must lie in [0, learning_rate={self.learning_rate}]")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"use one of {', '.join(LR_SCHEDULES)}")
        need(self.weight_decay >= 0.0, "weight_decay", "it must be 0 or more")
        for key in ("adam_beta1", "adam_beta2"):
            need(0.0 <= getattr(self, key) < 1.0, key, "it must lie in [0, 1), e.g. 0.9")
        need(self.adam_eps > 0.0, "adam_eps", "it must be positive, e.g. 1e-8")
        need(self.clip_grad >= 0.0, "clip_grad", "it must be 0 (off) or positive, e.g. 1.0")
        need(self.text_key != "", "text_key", "name the field that holds each document's text, e.g. text")
        need(self.output_dir != "", "output_dir", "name a folder, e.g. runs/gpt-tiny")
        reports = [r.strip() for r in self.report_to.split(",")]
        need(all(r in REPORT_TO for r in reports), "report_to", f"use one of {', '.join(REPORT_TO)}")

        for prefix in self.data_prefixes:
            if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
                raise RecipeError(
                    f"recipe key data_path={self.data_path!r}: {prefix}.bin/.idx not found; give the prefix that "
                    "`megahf preprocess --output-prefix P` wrote, P_text_document"
                )
        if self.corpus != EMBEDDED_CORPUS:
            if not os.path.isfile(self.corpus):
                raise RecipeError(
                    f"recipe key corpus={self.corpus!r}: no such file; give a local "
                    f"{'/'.join(CORPUS_EXTENSIONS)} file or '{EMBEDDED_CORPUS}' for the shipped corpus"
                )
            if not self.corpus.endswith(CORPUS_EXTENSIONS):
                raise RecipeError(
                    f"recipe key corpus={self.corpus!r}: unsupported file type; use a "
                    f"{'/'.join(CORPUS_EXTENSIONS)} file"
                )
        if self.tokenizer != EMBEDDED_TOKENIZER and self.tokenizer.startswith((".", "/")) and not os.path.isdir(
            self.tokenizer
        ):
            raise RecipeError(
                f"recipe key tokenizer={self.tokenizer!r}: no such folder; give a tokenizer folder or "
                f"'{EMBEDDED_TOKENIZER}' for the shipped GPT-2 tokenizer"
            )

        config = self.build_config()
        if type(config).__name__ == "MegatronBertConfig" and self.tokenizer in GPT2_TOKENIZER_NAMES:
            raise RecipeError(
                f"recipe key tokenizer={self.tokenizer!r} does not fit model={self.model!r}: BERT needs a WordPiece "
                f"tokenizer with [CLS], [SEP], [MASK] and [PAD]; use '{EMBEDDED_BERT_TOKENIZER}' (shipped) or a "
                "tokenizer folder"
            )
        try:
            config.check_tensor_parallel(self.tensor_parallel_size)
        except ValueError as error:
            raise RecipeError(
                f"recipe key tensor_parallel_size={self.tensor_parallel_size} does not fit model={self.model!r}: "
                f"{error}".replace("tp_size=", "tensor_parallel_size=")
            ) from None
        learned = getattr(config, "position_embedding_type", "learned_absolute") == "learned_absolute"  # BERT: always
        if learned and self.seq_length > config.max_position_embeddings:
            raise RecipeError(
                f"recipe key seq_length={self.seq_length} exceeds the model's max_position_embeddings="
                f"{config.max_position_embeddings}; lower seq_length or set model_overrides.max_position_embeddings"
            )


# ---------------------------------------------------------------------- loading


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PretrainRecipe:
    """Read a YAML recipe, apply `--key value` overrides (`--key=value`, `--model_overrides.field value`, a bare
    `--flag` for booleans) and validate the result. `path=None` starts from the defaults."""
    values: dict[str, Any] = {}
    where = "the recipe"
    if path is not None:
        where = str(path)
        values = _read_yaml(where)
    specs = _field_types()
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in specs:
            raise RecipeError(f"unknown recipe key {key!r} in {where}{_did_you_mean(str(key), specs)}")
        checked[key] = _check_type(key, value, specs[key], f"in {where}")
    for key, value in parse_overrides(overrides or []):
        base, _, sub = key.partition(".")
        if base not in specs:
            raise RecipeError(
                f"unknown recipe key {base!r} on the command line (--{key})"
                f"{_did_you_mean(base, specs, prefix='--')}"
            )
        where_cli = f"on the command line (--{key})"
        if value is True and specs[base] is not bool:
            raise RecipeError(f"--{key} needs a value, e.g. --{key} {_EXAMPLES[specs[base]]}")
        if sub:
            if specs[base] is not dict:
                raise RecipeError(f"--{key}: only model_overrides takes dotted sub-keys; write --{base} VALUE")
            mapping = dict(checked.get(base, {}))
            mapping[sub] = _parse_scalar(value)
            checked[base] = mapping
        else:
            checked[base] = _check_type(base, _from_command_line(value, specs[base]), specs[base], where_cli,
                                        command_line=True)
    recipe = PretrainRecipe(**checked)
    recipe.validate()
    return recipe


def parse_overrides(tokens: list[str]) -> list[tuple[str, str | bool]]:
    """`["--a", "1", "--b=2", "--flag"]` -> `[("a", "1"), ("b", "2"), ("flag", True)]` (dashes in names become
    underscores)."""
    pairs: list[tuple[str, str | bool]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise RecipeError(f"unexpected command-line argument {token!r}; overrides look like --key value")
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if eq:
            pairs.append((name, value))
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            pairs.append((name, tokens[i + 1]))
            i += 2
        else:  # a bare flag: true for a boolean key, an error for anything else (reported by the type check)
            pairs.append((name, True))
            i += 1
    return pairs


def save_recipe(recipe: PretrainRecipe, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(recipe.to_dict(), f, sort_keys=False)


def recipe_help() -> str:
    """One line per recipe key: name, default, help (for `megahf pretrain --help`)."""
    lines = []
    for f in dataclasses.fields(PretrainRecipe):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name} (default: {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- helpers

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
_EXAMPLES = {int: "300", float: "1.0e-3", bool: "true", str: "some-text", dict: "{num_layers: 2}"}


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file {path!r} not found; pass the path of a YAML recipe, e.g. recipes/gpt/tiny.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe keys (key: value lines), got {type(values).__name__}")
    return values


def _field_types() -> dict[str, type]:
    """Recipe key -> the plain type its value must have (int, float, bool, str, dict)."""
    hints = typing.get_type_hints(PretrainRecipe)
    specs = {}
    for f in dataclasses.fields(PretrainRecipe):
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
            origin = typing.get_origin(hint)
        specs[f.name] = origin or hint
    return specs


def _check_type(key: str, value: Any, kind: type, where: str, command_line: bool = False) -> Any:
    ok = False
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string: accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if not ok:
        raise RecipeError(
            f"recipe key {key!r} {where} must be {_TYPE_NAMES[kind]}, got {value!r} ({type(value).__name__}); "
            + (f"pass e.g. --{key} {_EXAMPLES[kind]}" if command_line else f"write e.g. {key}: {_EXAMPLES[kind]}")
        )
    return value


def _from_command_line(value: str | bool, kind: type) -> Any:
    """Turn a command-line string into the field's type when it reads as one; otherwise leave it for the check."""
    if value is True or kind is str:
        return value
    if kind is dict:
        parsed = _parse_scalar(value)
        return parsed if isinstance(parsed, dict) else value
    if kind is bool:
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
            value.lower(), value
        )
    try:
        return int(value) if kind is int else float(value)
    except ValueError:
        return value


def _parse_scalar(value: str | bool) -> Any:
    if value is True:
        return True
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _did_you_mean(word: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _config_keys(config_class) -> set[str]:
    """The constructor fields of a (dataclass) config plus the transformers aliases of its attribute map."""
    keys = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "attribute_map", {}))
    return keys - {"transformers_version", "architectures"}


__all__ = ["PretrainRecipe", "RecipeError", "load_recipe", "parse_overrides", "recipe_help", "save_recipe"]
