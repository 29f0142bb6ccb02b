"""The model card (README.md) of a published folder, rendered from what the folder knows and nothing else:
YAML metadata (license, library, tags, datasets, language, pipeline tag, base model, model-index), then the model,
its training, its results, the conversion proof, a usage snippet and what the model must not be used for.
Deterministic: the same folder renders the same card, so pushing it again uploads nothing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import yaml

from .folder import PublishSource, is_hub_id
from .model_index import Result, all_results, model_index

# the class a folder was saved as -> (Auto class to load it with, pipeline tag)
ARCHITECTURES = {
    "MegatronGPTForCausalLM": ("AutoModelForCausalLM", "text-generation"),
    "MegatronGPTModel": ("AutoModel", "feature-extraction"),
    "MegatronBertForPreTraining": ("AutoModelForMaskedLM", "fill-mask"),
    "MegatronBertForMaskedLM": ("AutoModelForMaskedLM", "fill-mask"),
    "MegatronBertModel": ("AutoModel", "feature-extraction"),
    "MegatronBertForSequenceClassification": ("AutoModelForSequenceClassification", "text-classification"),
    "MegatronBertForMultipleChoice": ("AutoModelForMultipleChoice", "multiple-choice"),
    "MegatronBertForQuestionAnswering": ("AutoModelForQuestionAnswering", "question-answering"),
    "MegatronBertForTokenClassification": ("AutoModelForTokenClassification", "token-classification"),
}
PEFT_TASKS = {"CAUSAL_LM": ("AutoModelForCausalLM", "text-generation"),
              "SEQ_CLS": ("AutoModelForSequenceClassification", "text-classification"),
              "TOKEN_CLS": ("AutoModelForTokenClassification", "token-classification"),
              "QUESTION_ANS": ("AutoModelForQuestionAnswering", "question-answering"),
              "FEATURE_EXTRACTION": ("AutoModel", "feature-extraction")}
SMALL_RUN_TOKENS = 1e9  # below this many training tokens a language model knows little beyond its corpus's style


@dataclass
class CardOptions:
    repo_id: str | None = None  # USER/NAME; None: a local review render (the snippet says USER/NAME)
    revision: str | None = None  # the branch the files are pushed to (None or "main": the default branch)
    license: str = "apache-2.0"
    base_model: str | None = None  # overrides what the folder names (adapter_config, results.json, conversion)
    parameters: int | None = None  # counted from the safetensors headers by the caller
    files: list[str] | None = None  # what is uploaded, listed in the card


def render_card(source: PublishSource, options: CardOptions) -> str:
    results = all_results(source)
    meta = metadata(source, options, results)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100)
    sections = [f"# {model_name(source, options)}", summary(source, options), model_section(source, options),
                training_section(source), results_section(results), conversion_section(source),
                usage_section(source, options), limitations_section(source), files_section(options)]
    return f"---\n{front}---\n\n" + "\n\n".join(s.strip() for s in sections if s and s.strip()) + "\n"


# ---------------------------------------------------------------------- metadata


def model_name(source: PublishSource, options: CardOptions) -> str:
    if options.repo_id:
        return options.repo_id.split("/")[-1]
    return source.folder.resolve().name


def load_class(source: PublishSource) -> tuple[str, str]:
    """(the Auto class that loads the folder, its pipeline tag)."""
    if source.is_adapter:
        task = source.adapter_config.get("task_type")
        if task in PEFT_TASKS:
            return PEFT_TASKS[task]
        if source.results:
            race = "race" in str(source.results.get("dataset", "")).lower()
            return ("AutoModelForMultipleChoice", "multiple-choice") if race else \
                ("AutoModelForSequenceClassification", "text-classification")
        return "AutoModel", "feature-extraction"
    architectures = (source.config or {}).get("architectures") or []
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    family = source.family
    if family is not None and family.model_type == "megatron_gpt":
        return ARCHITECTURES["MegatronGPTForCausalLM"]
    return "AutoModel", "feature-extraction"


def base_model(source: PublishSource, options: CardOptions) -> str | None:
    """The Hub id this model derives from: given, or named by the adapter, the fine-tuning or the conversion."""
    if options.base_model:
        return options.base_model
    candidates = [(source.adapter_config or {}).get("base_model_name_or_path"),
                  (source.results or {}).get("model"), (source.conversion or {}).get("source")]
    return next((c for c in candidates if is_hub_id(c)), None)


def training_datasets(source: PublishSource) -> list[str]:
    datasets = []
    recipe = source.recipe or {}
    for key in ("corpus", "data_path"):
        if is_hub_id(recipe.get(key)):
            datasets.append(recipe[key])
    if source.results and is_hub_id(source.results.get("dataset")) and not source.results.get("smoke"):
        datasets.append(source.results["dataset"])
    return list(dict.fromkeys(datasets))


def metadata(source: PublishSource, options: CardOptions, results: list[Result]) -> dict[str, Any]:
    _, pipeline = load_class(source)
    family = source.family
    tags = ["megatron", "megahf"]
    if family is not None:
        tags += [family.folder, "custom_code"]
    if source.is_adapter:
        tags += ["peft", "lora"] if source.adapter_config.get("peft_type", "LORA") == "LORA" else ["peft"]
    if source.results:
        tags.append(str(source.results.get("task", "")))
    meta: dict[str, Any] = {
        "license": options.license,
        "library_name": "peft" if source.is_adapter else "transformers",
        "tags": [t for t in dict.fromkeys(tags) if t],
        "language": ["en"],
        "pipeline_tag": pipeline,
    }
    datasets = training_datasets(source)
    if datasets:
        meta["datasets"] = datasets
    base = base_model(source, options)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if source.is_adapter else "finetune"
    index = model_index(model_name(source, options), results)
    if index:
        meta["model-index"] = index
    return meta


# ---------------------------------------------------------------------- body


def summary(source: PublishSource, options: CardOptions) -> str:
    family = source.family
    what = {"megatron_gpt": "a Megatron-LM GPT (decoder-only language model)",
            "megatron_bert": "a Megatron-LM BERT (bidirectional encoder)"}.get(
        family.model_type if family else "", "a transformers model")
    if source.is_adapter:
        what = "a LoRA adapter (peft)"
    how = []
    if source.metrics:
        how.append("pretrained with `megahf pretrain`")
    if source.results:
        how.append(f"fine-tuned on {source.results.get('task', 'a task')} with `megahf finetune`")
    if source.conversion:
        how.append("converted to the transformers layout (the proof is below)")
    made = f", {', '.join(how)}" if how else ""
    code = (" Its configuration and modeling code are in this repository (`trust_remote_code=True`): megahf is not "
            "needed to use it." if family is not None else "")
    base = base_model(source, options)
    on = f" Base model: [{base}](https://huggingface.co/{base})." if base else ""
    return f"This is {what}{made}, published with megahf (Megatron-LM on transformers).{code}{on}"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> str:
    rows = [(k, v) for k, v in rows if v is not None]
    if not rows:
        return ""
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v).replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines)


def model_section(source: PublishSource, options: CardOptions) -> str:
    if source.is_adapter:
        a = source.adapter_config
        rows = [("method", a.get("peft_type")), ("rank r", a.get("r")), ("alpha", a.get("lora_alpha")),
                ("dropout", a.get("lora_dropout")), ("target modules", a.get("target_modules")),
                ("modules trained fully", a.get("modules_to_save")), ("task type", a.get("task_type")),
                ("base model (as recorded)", a.get("base_model_name_or_path")),
                ("adapter parameters", options.parameters)]
        return "## Adapter\n\n" + _table(rows, ("", "value"))
    c = source.config or {}
    rows = [("class", (c.get("architectures") or [None])[0]), ("model_type", c.get("model_type")),
            ("parameters", options.parameters),
            ("layers", c.get("num_layers", c.get("num_hidden_layers"))), ("hidden size", c.get("hidden_size")),
            ("attention heads", c.get("num_attention_heads")), ("query groups", c.get("num_query_groups")),
            ("FFN hidden size", c.get("ffn_hidden_size") or (4 * c["hidden_size"] if "hidden_size" in c else None)),
            ("vocabulary", c.get("vocab_size")), ("padded to a multiple of", c.get("make_vocab_size_divisible_by")),
            ("max positions", c.get("max_position_embeddings")),
            ("position embedding", c.get("position_embedding_type")), ("normalization", c.get("normalization")),
            ("layer norm order", c.get("layernorm_order")), ("activation", c.get("activation")),
            ("bias in linear layers", c.get("add_bias_linear")), ("tied input/output embedding",
                                                                  c.get("tie_word_embeddings")),
            ("weights dtype", c.get("dtype"))]
    count = ("The parameter count is the sum of the tensors in the safetensors files (the embedding's padded rows "
             "included, tied weights once).") if options.parameters else ""
    return "## Model\n\n" + _table(rows, ("", "value")) + ("\n\n" + count if count else "")


def training_section(source: PublishSource) -> str:
    m, r, recipe = source.metrics or {}, source.results or {}, source.recipe or {}
    if not (m or r or recipe):
        return ""
    corpus = recipe.get("corpus")
    data = ("the four Shakespeare plays shipped with megahf (public domain, under 1 MB of text)" if corpus == "embedded"
            else corpus or recipe.get("data_path"))
    rows = [("training data", data), ("tokenizer", recipe.get("tokenizer")),
            ("sequence length", recipe.get("seq_length"))]
    if m:
        hours = m.get("wall_time_s")
        rows += [("steps", m.get("steps")), ("tokens seen", m.get("tokens_seen")), ("epochs", m.get("epochs")),
                 ("parallel layout", m.get("layout")), ("hardware", m.get("device")),
                 ("wall time (s)", round(hours, 1) if isinstance(hours, (int, float)) else None),
                 ("training time (s)", m.get("train_time_s")), ("tokens/s", m.get("tokens_per_second")),
                 ("MFU", f"{m['mfu']:.1%}" if isinstance(m.get("mfu"), (int, float)) else None),
                 ("MFU peak", f"{_fmt(m.get('peak_tflops'))} TFLOP/s ({m.get('peak_source')})"
                  if m.get("peak_tflops") else None),
                 ("train loss (first -> final)", f"{_fmt(m.get('first_train_loss'))} -> "
                  f"{_fmt(m.get('final_train_loss'))}" if m.get("final_train_loss") is not None else None),
                 ("validation loss", m.get("valid_loss")), ("validation perplexity", m.get("valid_ppl"))]
    if r:
        rows += [("fine-tuned from", r.get("model")), ("task", r.get("task")), ("dataset", r.get("dataset")),
                 ("peft", r.get("peft")), ("optimizer", r.get("optim")), ("steps", r.get("steps")),
                 ("epochs", r.get("epochs")), ("train rows", r.get("train_rows")),
                 ("global batch size", r.get("global_batch_size")), ("learning rate", r.get("learning_rate")),
                 ("max sequence length", r.get("max_seq_length")), ("parallel layout", r.get("layout"))]
    text = "## Training\n\n" + _table(rows, ("", "value"))
    if source.loss_png:
        text += "\n\n![Training and validation loss](loss.png)"
    if recipe:
        body = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
        text += ("\n\n<details><summary>The recipe as run (recipe.yaml)</summary>\n\n```yaml\n" + body +
                 "```\n\n</details>")
    return text


def results_section(results: list[Result]) -> str:
    if not results:
        return ""
    lines = ["## Results", "", "| task | dataset | split | metric | value | file |", "|---|---|---|---|---|---|"]
    for r in results:
        mark = " (shipped fixture, NOT the real data)" if r.smoke else ""
        lines.append(f"| {r.task_name} | {r.dataset_name}{mark} | {r.split} | {r.metric_name} | {_fmt(r.value)} | "
                     f"{r.source} |")
    if any(r.smoke for r in results):
        lines += ["", "Rows marked *shipped fixture* were computed on megahf's tiny test fixtures: they check that "
                      "the pipeline runs and mean nothing about the model; they are not in the metadata."]
    return "\n".join(lines)


def conversion_section(source: PublishSource) -> str:
    c = source.conversion
    if not c:
        return ""
    known = [("converted from", c.get("source")), ("source format", c.get("source_format")),
             ("max |logit difference|", c.get("max_abs_logit_diff")),
             ("mean |logit difference|", c.get("mean_abs_logit_diff")), ("tolerance", c.get("tolerance")),
             ("round trip (convert back, compare)", c.get("round_trip"))]
    keys = {"source", "source_format", "max_abs_logit_diff", "mean_abs_logit_diff", "tolerance", "round_trip"}
    other = [(k, json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in c.items() if k not in keys]
    return ("## Conversion proof\n\nThe logits of this model were compared with those of the model it was "
            "converted from, on the same inputs (conversion.json):\n\n" + _table(known + other, ("", "value")))


def usage_section(source: PublishSource, options: CardOptions) -> str:
    repo = options.repo_id or "USER/NAME"
    revision = f', revision="{options.revision}"' if options.revision and options.revision != "main" else ""
    auto, pipeline = load_class(source)
    # AutoTokenizer reads config.json too, and asks before running the code auto_map names: trust it there as well
    remote = ", trust_remote_code=True" if source.family is not None else ""
    if source.is_adapter:
        base = base_model(source, options) or source.adapter_config.get("base_model_name_or_path") or "BASE"
        labels = _adapter_labels(source)
        extra = f", num_labels={labels}" if labels and auto == "AutoModelForSequenceClassification" else ""
        code = (f"from peft import PeftModel\nfrom transformers import {auto}, AutoTokenizer\n\n"
                f'base = {auto}.from_pretrained("{base}", trust_remote_code=True{extra})\n'
                f'model = PeftModel.from_pretrained(base, "{repo}"{revision})\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}"{revision})\n'
                + _example(pipeline, "model", "tokenizer"))
        note = ("" if is_hub_id(base) else
                f"\n\nThe adapter was trained on the local model `{base}`: publish that model too (`megahf push`) "
                "and name it with `--base-model USER/BASE`, so that this snippet loads it.")
        return f"## Usage\n\nWith `pip install transformers peft torch`:\n\n```python\n{code}```{note}"
    code = (f"from transformers import {auto}, AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}"{revision}{remote})\n'
            f'model = {auto}.from_pretrained("{repo}"{revision}{remote})\n' + _example(pipeline, "model", "tokenizer"))
    return f"## Usage\n\nWith `pip install transformers torch` (megahf is not needed):\n\n```python\n{code}```"


def _example(pipeline: str, model: str, tokenizer: str) -> str:
    if pipeline == "text-generation":
        return (f'inputs = {tokenizer}("ROMEO:", return_tensors="pt")\n'
                f"output = {model}.generate(**inputs, max_new_tokens=20, do_sample=True, top_k=40)\n"
                f"print({tokenizer}.decode(output[0]))\n")
    if pipeline == "fill-mask":
        return (f'inputs = {tokenizer}("the king is [MASK] .", return_tensors="pt")\n'
                f"logits = {model}(**inputs).logits\n"
                f"masked = inputs.input_ids[0] == {tokenizer}.mask_token_id\n"
                f"print({tokenizer}.decode(logits[0, masked].argmax(-1)))\n")
    if pipeline == "text-classification":
        return (f'inputs = {tokenizer}("a gripping , funny film .", return_tensors="pt")\n'
                f"print({model}(**inputs).logits.softmax(-1))\n")
    if pipeline == "multiple-choice":
        return ('question, options = "what do cats chase ?", ["mice", "clouds", "numbers", "laws"]\n'
                f'inputs = {tokenizer}([question] * len(options), options, return_tensors="pt", padding=True)\n'
                f"scores = {model}(**{{k: v.unsqueeze(0) for k, v in inputs.items()}}).logits\n"
                "print(options[scores.argmax(-1).item()])\n")
    return (f'inputs = {tokenizer}("a sentence to encode", return_tensors="pt")\n'
            f"print({model}(**inputs)[0].shape)\n")


def _adapter_labels(source: PublishSource) -> int | None:
    """The number of labels of an adapter's fully trained head: the smallest output size among its non-LoRA
    matrices (the head's last projection), read from the safetensors header."""
    from .shards import tensor_shapes

    files = sorted(source.model_dir.glob("adapter_model*.safetensors"))
    shapes = [s for name, s in tensor_shapes(files).items() if "lora_" not in name and len(s) == 2]
    return min(s[0] for s in shapes) if shapes else None


def limitations_section(source: PublishSource) -> str:
    m, recipe = source.metrics or {}, source.recipe or {}
    tokens = m.get("tokens_seen")
    small = isinstance(tokens, (int, float)) and tokens < SMALL_RUN_TOKENS
    lines = ["## Intended use, limitations and bias", ""]
    if recipe.get("corpus") == "embedded":
        lines.append("This model was trained on four Shakespeare plays only. It can produce text that looks like "
                     "Early Modern English verse and prose; it cannot state facts, answer questions, follow "
                     "instructions, write modern English reliably, or reason. It is a demonstration and a test "
                     "artifact of the training code, not a language model for any application.")
    elif small:
        lines.append(f"This model saw {tokens:,} training tokens, far too few for general use: it imitates the "
                     "style of its corpus and knows little else. Treat it as a research or test artifact.")
    if source.results and source.results.get("smoke"):
        lines.append("It was fine-tuned on megahf's tiny shipped fixture, not on the real task data: its task "
                     "predictions are meaningless.")
    lines += [
        "",
        "- Intended use: research on training and evaluating transformer models, and as a starting point for "
        "fine-tuning. It has no safety tuning and no content filter.",
        "- Out of scope: any decision about people (hiring, credit, health, law), medical, legal or financial "
        "advice, and any use where a wrong or offensive output causes harm. Do not present its output as fact.",
        "- Bias: a model learns the views, stereotypes and omissions of its training text" + (
            " (for Shakespeare's plays: those of 16th-17th century England, including their treatment of women, race "
            "and religion)" if recipe.get("corpus") == "embedded" else "") + " and can repeat or amplify them. "
        "Nobody has measured this model's biases.",
        "- The figures above are what was measured, on the data sets named; they do not predict performance on "
        "other data.",
    ]
    return "\n".join(lines)


def files_section(options: CardOptions) -> str:
    if not options.files:
        return ""
    return "## Files\n\n" + "\n".join(f"- `{name}`" for name in options.files)


__all__ = ["ARCHITECTURES", "CardOptions", "load_class", "render_card"]
