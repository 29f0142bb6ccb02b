"""`megahf evaluate lambada|wikitext`: check every input, then evaluate, print one table, write `--output-json`.

Every check (model folder, causal LM, sequence length, tokenizer, data, passage lengths, output location) runs before
the model's weights are loaded, so bad input costs no compute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_json
from ..errors import explain_write_errors
from ..recipe.evaluate import evaluation_settings
from . import lambada, wikitext
from .common import (EvaluationError, check_causal_lm, check_model_folder, load_model, load_tokenizer,
                     resolve_seq_length)


def _check_output(path: str | None) -> None:
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise EvaluationError(f"--output-json {path}: the folder {parent} does not exist; create it or pass another "
                              "path")


def _device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    """`megahf evaluate TASK` with the parsed command line (`--recipe` keys filled in where a flag is not given)."""
    keys = ["model", "data", "seq_length", "micro_batch_size", "tokenizer", "output_json", "device",
            "strict" if args.task == "lambada" else "overlapping_eval"]
    settings_ = evaluation_settings(args.task, args.recipe, {key: getattr(args, key) for key in keys})
    resolved = argparse.Namespace(**{**vars(args), **vars(settings_)})
    return evaluate(resolved)


def evaluate(args: argparse.Namespace) -> int:
    config = check_model_folder(args.model)
    check_causal_lm(args.model, config, "LAMBADA" if args.task == "lambada" else "WikiText perplexity")
    seq_length = resolve_seq_length(args.model, config, args.seq_length)
    _check_output(args.output_json)
    tokenizer, tokenizer_source = load_tokenizer(args.model, config, args.tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    progress = not args.no_progress
    settings: dict[str, Any] = {"task": args.task, "model": str(args.model), "tokenizer": tokenizer_source,
                                "seq_length": seq_length, "micro_batch_size": args.micro_batch_size}

    if args.task == "lambada":
        texts = lambada.load_texts(args.data)
        examples = lambada.featurize(texts, tokenizer, args.strict)
        lambada.check_lengths(examples, seq_length)
        model = load_model(args.model, _device(args.device))
        result = lambada.score(model, examples, args.micro_batch_size, pad_id, progress)
        figures = {"accuracy": result.accuracy, "correct": result.correct, "total": result.total,
                   "strict": bool(args.strict)}
        data = args.data if args.data is not None else lambada.HUB_NAME
    else:
        text = wikitext.load_text(args.data)
        features = wikitext.featurize(text, tokenizer)
        if features.num_tokenized_tokens < 2:
            raise EvaluationError(f"--data {args.data}: the text has {features.num_tokenized_tokens} BPE token(s); "
                                  "perplexity needs at least 2: pass a longer text")
        window_list = wikitext.windows(features.tokens, seq_length, args.overlapping_eval)
        model = load_model(args.model, _device(args.device))
        total, count = wikitext.summed_nll(model, window_list, args.micro_batch_size, pad_id, progress)
        result = wikitext.WikiTextResult(summed_nll=total, num_original_tokens=features.num_original_tokens,
                                         num_tokenized_tokens=features.num_tokenized_tokens, num_scored=count)
        figures = {"loss": result.loss, "perplexity": result.perplexity,
                   "adjusted_perplexity": result.adjusted_perplexity,
                   "num_original_tokens": result.num_original_tokens,
                   "num_tokenized_tokens": result.num_tokenized_tokens}
        settings["overlapping_eval"] = args.overlapping_eval
        data = args.data if args.data is not None else f"{wikitext.HUB_NAME} ({wikitext.HUB_CONFIG})"

    report = {**figures, **settings, "data": str(data)}
    print(format_table(report))
    if args.output_json is not None:
        with explain_write_errors(args.output_json, intact="nothing was written"):
            atomic_write_json(args.output_json, report, indent=2)
        print(f"wrote {args.output_json}", file=sys.stderr)
    return 0


def format_table(report: dict[str, Any]) -> str:
    """The figures and settings as a two-column table."""
    def shown(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    rows = [(key, shown(value)) for key, value in report.items() if value is not None]
    width = max(len(key) for key, _ in rows)
    title = f"megahf evaluate {report['task']}"
    lines = [title, "-" * max(len(title), width + 2 + max(len(v) for _, v in rows))]
    lines += [f"{key:<{width}}  {value}" for key, value in rows]
    return "\n".join(lines)
