"""`megahf evaluate lambada|wikitext`: check every input, then evaluate, print one table, write `--output-json`.

Every check (model folder, causal LM, sequence length, tokenizer, data, passage lengths, output location) runs before
the model's weights are loaded, so bad input costs no compute. Under torchrun / `accelerate launch` each replica
(`--tensor-parallel-size` ranks) scores a slice of the examples, every rank reduces all of them in example order,
and rank 0 alone prints and writes (`distributed.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_json
from ..errors import explain_write_errors
from ..recipe.evaluate import evaluation_settings
from . import distributed, lambada, wikitext
from .common import (EvaluationError, check_causal_lm, check_model_folder, load_model, load_tokenizer,
                     resolve_seq_length, weights_folder)


def _check_output(path: str | None) -> None:
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise EvaluationError(f"--output-json {path}: the folder {parent} does not exist; create it or pass another "
                              "path")


def _device(requested: str | None, world: int) -> str:
    if requested:
        return requested
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world > 1 else "cuda"


def run(args: argparse.Namespace) -> int:
    """`megahf evaluate TASK` with the parsed command line (`--recipe` keys filled in where a flag is not given)."""
    keys = ["model", "data", "seq_length", "micro_batch_size", "tokenizer", "output_json", "device",
            "tensor_parallel_size", "strict" if args.task == "lambada" else "overlapping_eval"]
    settings_ = evaluation_settings(args.task, args.recipe, {key: getattr(args, key) for key in keys})
    resolved = argparse.Namespace(**{**vars(args), **vars(settings_)})
    return evaluate(resolved)


def evaluate(args: argparse.Namespace) -> int:
    """Check every input, then score this replica's slice of the examples; rank 0 prints and writes the figures."""
    config = check_model_folder(args.model)
    check_causal_lm(args.model, config, "LAMBADA" if args.task == "lambada" else "WikiText perplexity")
    seq_length = resolve_seq_length(args.model, config, args.seq_length)
    layout = distributed.check_layout(weights_folder(args.model), getattr(args, "tensor_parallel_size", 1))
    _check_output(args.output_json)
    tokenizer, tokenizer_source = load_tokenizer(args.model, config, args.tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    settings: dict[str, Any] = {"task": args.task, "model": str(args.model), "tokenizer": tokenizer_source,
                                "seq_length": seq_length, "micro_batch_size": args.micro_batch_size}
    if weights_folder(args.model) != Path(args.model):
        settings["base_model"] = str(weights_folder(args.model))  # the adapter's, merged into it

    if args.task == "lambada":
        texts = lambada.load_texts(args.data)
        examples = lambada.featurize(texts, tokenizer, args.strict)
        lambada.check_lengths(examples, seq_length)
        data = args.data if args.data is not None else lambada.HUB_NAME
    else:
        text = wikitext.load_text(args.data)
        features = wikitext.featurize(text, tokenizer)
        if features.num_tokenized_tokens < 2:
            raise EvaluationError(f"--data {args.data}: the text has {features.num_tokenized_tokens} BPE token(s); "
                                  "perplexity needs at least 2: pass a longer text")
        examples = wikitext.windows(features.tokens, seq_length, args.overlapping_eval)
        settings["overlapping_eval"] = args.overlapping_eval
        data = args.data if args.data is not None else f"{wikitext.HUB_NAME} ({wikitext.HUB_CONFIG})"

    device = _device(args.device, layout.world_size)
    where, created = distributed.start(layout, device)
    try:
        model = load_model(args.model, device, where.distributed_config())
        distributed.check_mesh(model, where)
        mine = examples[where.my_slice(len(examples))]
        progress = not args.no_progress and where.rank == 0
        if args.task == "lambada":
            flags = lambada.correct_flags(model, mine, args.micro_batch_size, pad_id, progress)
            flags = distributed.gather_in_order(flags, where)
            result = lambada.LambadaResult(correct=sum(flags), total=len(flags))
            figures = {"accuracy": result.accuracy, "correct": result.correct, "total": result.total,
                       "strict": bool(args.strict)}
        else:
            per_window = wikitext.window_nlls(model, mine, args.micro_batch_size, pad_id, progress)
            total, count = wikitext.add_up(distributed.gather_in_order(per_window, where))
            result = wikitext.WikiTextResult(summed_nll=total, num_original_tokens=features.num_original_tokens,
                                             num_tokenized_tokens=features.num_tokenized_tokens, num_scored=count)
            figures = {"loss": result.loss, "perplexity": result.perplexity,
                       "adjusted_perplexity": result.adjusted_perplexity,
                       "num_original_tokens": result.num_original_tokens,
                       "num_tokenized_tokens": result.num_tokenized_tokens}
        settings["tensor_parallel_size"] = where.tensor_parallel_size
        settings["data_parallel_size"] = where.data_parallel_size
        report = {**figures, **settings, "data": str(data)}
        if where.rank == 0:
            print(format_table(report))
            if args.output_json is not None:
                with explain_write_errors(args.output_json, intact="nothing was written"):
                    atomic_write_json(args.output_json, report, indent=2)
                print(f"wrote {args.output_json}", file=sys.stderr)
    finally:
        distributed.finish(created)
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
