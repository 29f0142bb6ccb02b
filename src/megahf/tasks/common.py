"""What the evaluations share: their error, the model and tokenizer they load, the data they read, their batches.

Everything here that reads user input checks it and raises `EvaluationError` (a `MegahfError`: one line on the command
line) naming the thing and the fix, before any model computes anything.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import parallel  # noqa: F401  (attaches megahf's distribution hooks to its model classes)
from ..adapter_folder import AdapterFolderError, adapter_base, is_adapter_folder, merge_adapter
from ..assets import embedded_tokenizer_path
from ..errors import MegahfError, training_checkpoint_hint

#: The shipped tokenizer of each model family (`megahf.assets`), used when the model folder has none.
FAMILY_TOKENIZERS = {"megatron_gpt": "gpt2", "megatron_bert": "bert-uncased"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")


class EvaluationError(MegahfError, ValueError):
    """An evaluation's input (model, tokenizer, data, settings) cannot be used; the message says why and the fix."""


def weights_folder(model: str | os.PathLike) -> Path:
    """The folder whose config.json and weights `model` stands for: `model` itself, or the base model that a peft
    adapter folder names (its adapter_config.json), which must be a local folder too."""
    folder = Path(model)
    if not folder.is_dir():
        raise EvaluationError(f"--model {model}: no such folder; pass a saved model folder (e.g. a pretrain run's "
                              "final/, written by save_pretrained) or a peft adapter folder")
    if not is_adapter_folder(folder):
        return folder
    try:
        base, _ = adapter_base(folder)
    except AdapterFolderError as error:
        raise EvaluationError(f"--model {model}: {error}") from None
    if not Path(base).is_dir():
        raise EvaluationError(f"--model {model} is a peft adapter whose base model {base!r} is not a local folder; "
                              "save the base locally and set base_model_name_or_path in its adapter_config.json to "
                              "that folder")
    return Path(base)


def check_model_folder(model: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of the model folder `model` (of its base, for a peft adapter folder), read as a dict (no
    weights loaded yet)."""
    hint = training_checkpoint_hint(model)
    if hint:
        raise EvaluationError(f"--model {model}: {hint}")
    folder = weights_folder(model)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EvaluationError(f"--model {model}: the folder has no config.json; pass a folder written by "
                              "save_pretrained (e.g. a pretrain run's final/)")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvaluationError(f"--model {model}: config.json is not readable JSON ({error}); pass an intact model "
                              "folder") from error


def check_causal_lm(model: str | os.PathLike, config: dict[str, Any], task: str) -> None:
    """A zero-shot language-model evaluation needs a causal LM (a MegatronGPT), not an encoder such as BERT."""
    model_type = config.get("model_type", "?")
    architectures = config.get("architectures") or []
    encoder = model_type in ("megatron_bert", "bert") or config.get("is_encoder_decoder")
    if encoder or (architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)):
        raise EvaluationError(f"--model {model}: {task} needs a causal language model (e.g. a MegatronGPT), but this "
                              f"is a {model_type} ({', '.join(architectures) or 'no architecture'}); pass a GPT model")


def resolve_seq_length(model: str | os.PathLike, config: dict[str, Any], seq_length: int | None) -> int:
    """`--seq-length`, by default the model's `max_position_embeddings`; never longer than that."""
    max_positions = config.get("max_position_embeddings") or config.get("n_positions")
    if seq_length is None:
        if not max_positions:
            raise EvaluationError(f"--model {model}: config.json has no max_position_embeddings; pass --seq-length")
        return int(max_positions)
    if seq_length < 1:
        raise EvaluationError(f"--seq-length {seq_length}: must be at least 1")
    if max_positions and seq_length > max_positions:
        raise EvaluationError(f"--seq-length {seq_length} is larger than the model's max_position_embeddings="
                              f"{max_positions}; pass --seq-length {max_positions} or less")
    return seq_length


def load_tokenizer(model: str | os.PathLike, config: dict[str, Any], tokenizer: str | None = None):
    """`--tokenizer` (a shipped name such as `gpt2`, or a folder) if given; else the model folder's own tokenizer;
    else the shipped tokenizer of the model's family. Its vocabulary must fit the model's. Returns the tokenizer and
    where it came from, in words."""
    if tokenizer is not None:
        source = embedded_tokenizer_path(tokenizer) or tokenizer
        if not Path(source).is_dir():
            raise EvaluationError(f"--tokenizer {tokenizer}: neither a shipped tokenizer (gpt2, bert-uncased) nor a "
                                  "folder; pass one of those")
        where = f"--tokenizer {tokenizer}"
    elif any((Path(model) / name).is_file() for name in _TOKENIZER_FILES):
        source, where = str(model), f"the tokenizer of {model}"
    elif any((weights_folder(model) / name).is_file() for name in _TOKENIZER_FILES):  # an adapter's base
        source, where = str(weights_folder(model)), f"the tokenizer of {weights_folder(model)}"
    elif config.get("model_type") in FAMILY_TOKENIZERS:
        source = embedded_tokenizer_path(FAMILY_TOKENIZERS[config["model_type"]])
        where = f"the shipped {FAMILY_TOKENIZERS[config['model_type']]} tokenizer"
    else:
        raise EvaluationError(f"--model {model}: the folder has no tokenizer and megahf ships none for model_type="
                              f"{config.get('model_type')!r}; pass --tokenizer")
    loaded = AutoTokenizer.from_pretrained(source)
    vocab_size = config.get("vocab_size")
    if vocab_size and len(loaded) > vocab_size:
        raise EvaluationError(f"{where} has {len(loaded)} tokens but the model's vocab_size is {vocab_size}; pass "
                              "the tokenizer the model was trained with (--tokenizer)")
    return loaded, where


def load_model(model: str | os.PathLike, device: str | torch.device = "cpu", distributed_config=None):
    """The model folder as an `AutoModelForCausalLM` (megahf registers its models with it), in eval mode on `device`;
    with a `distributed_config` (tensor parallel), sharded by transformers onto this rank's device as training
    loads it (`megahf.parallel`: the vocabulary-parallel output layer, whose logits come back whole). A peft adapter
    folder: its base with the adapter merged into the weights, then sharded."""
    if is_adapter_folder(model):
        merged = merge_adapter(AutoModelForCausalLM.from_pretrained(weights_folder(model)), model).to(device)
        if distributed_config is not None:
            merged = parallel.distribute_model(merged, distributed_config)
        return merged.eval()
    if distributed_config is not None:
        return AutoModelForCausalLM.from_pretrained(model, distributed_config=distributed_config).eval()
    loaded = AutoModelForCausalLM.from_pretrained(model)
    return loaded.to(device).eval()


def load_hub_rows(data: str | None, hub_name: str, config_name: str | None, split: str, what: str,
                  local_hint: str) -> list[str]:
    """The `text` column of `split` of a local folder laid out like the Hub dataset `hub_name` (or, with no `data`,
    of the Hub dataset itself, which needs the network or the local cache)."""
    source = data if data is not None else hub_name
    try:
        if data is not None and config_name and not (Path(data) / config_name).is_dir():
            rows = datasets.load_dataset(source, split=split)  # a folder holding only the one config
        else:
            rows = datasets.load_dataset(source, config_name, split=split)
    except Exception as error:  # datasets raises many kinds (ConnectionError, DatasetNotFoundError, ValueError, ...)
        if data is None:
            raise EvaluationError(f"cannot load {what} from the Hub ({hub_name}: {type(error).__name__}); offline, "
                                  f"pass --data {local_hint}") from error
        raise EvaluationError(f"--data {data}: cannot load split {split!r} as {what} ({type(error).__name__}: "
                              f"{error}); pass {local_hint}") from error
    if "text" not in rows.column_names:
        raise EvaluationError(f"--data {source}: split {split!r} has no 'text' column (columns: "
                              f"{', '.join(rows.column_names)}); pass data with the text in a 'text' column")
    return list(rows["text"])


def read_jsonl_texts(path: str | os.PathLike) -> list[str]:
    """The `text` field of each line of a `.jsonl` file (Megatron's LAMBADA input)."""
    texts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise EvaluationError(f"--data {path}: line {number} is not JSON ({error}); pass one JSON object "
                                      "per line") from error
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise EvaluationError(f"--data {path}: line {number} has no string 'text' field; pass one "
                                      '{"text": ...} object per line')
            texts.append(record["text"])
    return texts


def right_padded(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` right-padded to the longest sequence and the matching `attention_mask` (1 on real tokens)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


def vocab_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """The model's logits over its real vocabulary (megahf's models already stop at `vocab_size`), in float32; with
    `keep` > 0 only those of the last `keep` positions. A model that takes `logits_to_keep` (transformers' causal
    LMs, megahf's) then runs its output layer on those positions alone: at a 50k vocabulary that layer is most of a
    small model's work, and an evaluation scores only a few positions of each sequence."""
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else input_ids.device
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if keep and _takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits
        if keep:
            logits = logits[:, -keep:]
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_size:
        logits = logits[..., :vocab_size]
    return logits.float()


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def progress_bar(total: int, description: str, enabled: bool):
    return tqdm(total=total, desc=description, unit="batch", disable=not enabled, leave=False)
