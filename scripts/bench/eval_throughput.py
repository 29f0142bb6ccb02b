#!/usr/bin/env python
"""Throughput of megahf's zero-shot evaluations (LAMBADA passages/s, WikiText tokens/s) against
lm-evaluation-harness on the same model and data, and against the same computation done one example at a time
with plain transformers, in the same run.

    python scripts/bench/eval_throughput.py --out scripts/bench/results/eval_throughput-cpu.txt
    python scripts/bench/eval_throughput.py --passages 64 --wikitext-tokens 4096 --rounds 2   # quicker

The three paths, all on one MegatronGPTForCausalLM (`gpt-tiny` preset: hidden 128, 4 layers, 4 heads, GPT-2's
50,257-token vocabulary padded to 50,304, positions = `--seq-length`), in eval mode, no grad. The model is first fitted
a few full-batch AdamW steps to the last word of every other passage (`--fit-steps`), so that it gets some LAMBADA
passages right and others wrong: a random model gets them all wrong, and an agreement of three accuracies of 0 would
prove nothing. Its weights change no timing.

* megahf: `megahf.tasks.lambada.featurize` (strict) + `correct_flags`, and `megahf.tasks.wikitext.featurize` +
  `windows` + `window_nlls`, batched by `--micro-batch-size` (what `megahf evaluate` runs);
* lm-eval: `lm_eval.simple_evaluate` through its transformers backend (HFLM wrapping the same model object,
  batch size `--micro-batch-size`) on its own `lambada_openai` and `wikitext` task definitions with the data source
  swapped for local files (end to end as its users run it: data loading, prompts, tokenization, scoring);
* one at a time: a loop over the passages (and the WikiText windows) calling the model on one sequence, batch 1,
  no padding, full logits, the argmax / cross entropy taken as megahf takes them.

Data (made here, throughput only: the figures of accuracy and perplexity mean nothing): `--passages` LAMBADA-like
passages of 40 to 100 words cut from megahf's shipped Shakespeare corpus (single spaces, so lm-eval and megahf
tokenize them alike), and a raw text of about `--wikitext-tokens` BPE tokens from the same corpus. WikiText windows:
`--overlapping-eval` defaults to `--seq-length` (disjoint windows), so that the three do the same number of
forwards as lm-eval's rolling windows; Megatron's setting of 32 would give megahf more context per token and more
work.

After an untimed warm-up on a few passages, the paths take turns (megahf, lm-eval, one at a time, then again) for
`--rounds` rounds; the median time is reported. The results of megahf and the one-at-a-time loop must agree (LAMBADA
flags exactly, the summed NLL to 1e-5 relative), and lm-eval's LAMBADA `acc` must equal megahf's accuracy, or the
script stops. After the rounds, one untimed lm-eval run with its samples logged is compared passage by passage: its
`acc` of every passage must equal megahf's verdict on it, and megahf's accuracy must lie strictly between 0 and 1 (a
comparison that cannot fail is refused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lm_eval
import transformers
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from megahf import MegatronGPTConfig, MegatronGPTForCausalLM
from megahf.assets import corpus_path, load_gpt2_tokenizer
from megahf.tasks import lambada, wikitext

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


def shakespeare_words() -> list[str]:
    with open(corpus_path(), encoding="utf-8") as lines:
        return [word for line in lines for word in json.loads(line)["text"].split()]


def make_passages(words: list[str], count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    passages, start = [], 0
    for _ in range(count):
        length = rng.randint(40, 100)
        passages.append(" ".join(words[start: start + length]))
        start += length
    return passages


def make_text(words: list[str], tokenizer, num_tokens: int) -> str:
    """Lines of 12 words from the end of the corpus (not the passages') until the text has `num_tokens` tokens."""
    lines, tokens, end = [], 0, len(words)
    while tokens < num_tokens:
        line = " ".join(words[end - 12: end])
        end -= 12
        lines.append(line)
        tokens += len(tokenizer(" " + line + "\n", add_special_tokens=False)["input_ids"])
    return "".join(" " + line + " \n" for line in lines)


def lm_eval_tasks(passages_file: Path, text_file: Path) -> list[dict]:
    """lm-eval's own `lambada_openai` and `wikitext` tasks, read from the installed package, their data source
    swapped for the local jsonl files (one `text` per passage; one `page` holding the whole raw text)."""
    lambada_task = load_yaml(LM_EVAL_TASKS / "lambada" / "lambada_openai.yaml")
    lambada_task.pop("tag", None)
    lambada_task.update(task="lambada_openai_local", dataset_path="json", dataset_name=None,
                        dataset_kwargs={"data_files": {"test": str(passages_file)}})
    wikitext_task = load_yaml(LM_EVAL_TASKS / "wikitext" / "wikitext.yaml")
    wikitext_task.update(task="wikitext_local", dataset_path="json", dataset_name=None, training_split=None,
                         validation_split=None, dataset_kwargs={"data_files": {"test": str(text_file)}})
    return [lambada_task, wikitext_task]


@torch.no_grad()
def one_at_a_time_lambada(model, tokenizer, passages: list[str]) -> list[bool]:
    flags = []
    for text in passages:
        context, last = lambada.split_last_word(text)
        labels = tokenizer(" " + last, add_special_tokens=False)["input_ids"]
        tokens = tokenizer(context, add_special_tokens=False)["input_ids"] + labels
        logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0, :, : model.config.vocab_size]
        predicted = logits[len(tokens) - 1 - len(labels):].argmax(dim=-1)
        flags.append(predicted.tolist() == labels)
    return flags


@torch.no_grad()
def one_at_a_time_wikitext(model, tokenizer, text: str, seq_length: int, overlap: int) -> float:
    features = wikitext.featurize(text, tokenizer)
    total = 0.0
    for window in wikitext.windows(features.tokens, seq_length, overlap):
        logits = model(input_ids=torch.tensor([window.tokens[:-1]])).logits[0, :, : model.config.vocab_size]
        nll = F.cross_entropy(logits.float(), torch.tensor(window.tokens[1:]), reduction="none")
        total += float(nll[torch.tensor(window.scored)].double().sum())
    return total


def fit_last_words(model, tokenizer, passages: list[str], steps: int) -> None:
    """A few full-batch AdamW steps on the tokens of " " + the last word of every other passage (the loss on those
    tokens only), as tests/tasks/task_helpers.py's `fitted_gpt` does: afterwards the model predicts some passages'
    last words and not others'."""
    from megahf.tasks.common import right_padded

    examples = lambada.featurize(passages[::2], tokenizer, strict=True)
    input_ids, attention_mask = right_padded([e.tokens for e in examples], 0)
    labels = torch.full_like(input_ids, -100)
    for row, example in enumerate(examples):
        end = len(example.tokens)
        labels[row, end - example.num_labels: end] = input_ids[row, end - example.num_labels: end]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model.train()
    model.config.loss_chunk_size = 1024  # the output layer and loss in chunks: no [passages, tokens, vocab] logits
    for _ in range(steps):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.config.loss_chunk_size = 0
    model.eval()


def megahf_lambada(model, tokenizer, passages, micro_batch_size) -> list[bool]:
    examples = lambada.featurize(passages, tokenizer, strict=True)
    return lambada.correct_flags(model, examples, micro_batch_size, tokenizer.eos_token_id)


def megahf_wikitext(model, tokenizer, text, seq_length, overlap, micro_batch_size) -> float:
    features = wikitext.featurize(text, tokenizer)
    window_list = wikitext.windows(features.tokens, seq_length, overlap)
    total, _ = wikitext.add_up(wikitext.window_nlls(model, window_list, micro_batch_size, tokenizer.eos_token_id))
    return total


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=96, help="LAMBADA-like passages (default 96)")
    parser.add_argument("--wikitext-tokens", type=int, default=6144, help="BPE tokens of the WikiText-like text")
    parser.add_argument("--seq-length", type=int, default=256, help="positions of the model = window length")
    parser.add_argument("--overlapping-eval", type=int, default=0, help="WikiText window stride (0: seq length)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fit-steps", type=int, default=15,
                        help="AdamW steps fitting the model to half the passages' last words (default 15)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared two-core machine two threads per process thrash)")
    parser.add_argument("--out", default=None, help="also write this output to a file")
    args = parser.parse_args(argv)
    overlap = args.overlapping_eval or args.seq_length
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_gpt2_tokenizer()
    config = MegatronGPTConfig.from_preset("gpt-tiny", hidden_size=args.hidden, num_layers=args.layers,
                                           num_attention_heads=args.heads, vocab_size=len(tokenizer),
                                           max_position_embeddings=args.seq_length)
    model = MegatronGPTForCausalLM(config)
    words = shakespeare_words()
    passages = make_passages(words, args.passages)
    fit_last_words(model, tokenizer, passages, args.fit_steps)
    text = make_text(words, tokenizer, args.wikitext_tokens)
    num_tokens = wikitext.featurize(text, tokenizer).num_tokenized_tokens
    passage_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in passages]

    say(f"torch {torch.__version__}, transformers {transformers.__version__}, lm-eval {lm_eval.__version__}, "
        f"python {platform.python_version()}, {args.threads} threads, CPU ({os.cpu_count()} cores)")
    say(f"model: MegatronGPTForCausalLM gpt-tiny shape, hidden {args.hidden}, {args.layers} layers, {args.heads} "
        f"heads, vocab {config.vocab_size} (padded {config.padded_vocab_size}), positions {args.seq_length}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, fp32, fitted {args.fit_steps} AdamW "
        "steps to the last word of every other passage")
    say(f"LAMBADA: {len(passages)} passages, {min(passage_tokens)}-{max(passage_tokens)} tokens "
        f"(mean {statistics.mean(passage_tokens):.0f}), strict; WikiText: {num_tokens} tokens, windows of "
        f"{args.seq_length} sliding by {overlap}; micro batch {args.micro_batch_size}; {args.rounds} rounds")
    load = os.getloadavg()[0]
    say(f"load average before: {load:.2f}" + (" (other jobs shared this machine while it ran)" if load >= 1 else ""))

    with tempfile.TemporaryDirectory() as tmp:
        passages_file, text_file = Path(tmp) / "lambada.jsonl", Path(tmp) / "wikitext.jsonl"
        passages_file.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages), encoding="utf-8")
        text_file.write_text(json.dumps({"page": text}) + "\n", encoding="utf-8")
        tasks = lm_eval_tasks(passages_file, text_file)
        manager = TaskManager(include_defaults=False)
        harness = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=args.micro_batch_size,
                       max_length=args.seq_length)

        def one_round(passages_, text_, tasks_):
            """Every path once, in turn: times (s) and results, checked against each other."""
            seconds, out = {}, {}
            out["flags"], seconds["megahf lambada"] = timed(
                lambda: megahf_lambada(model, tokenizer, passages_, args.micro_batch_size))
            out["lm lambada"], seconds["lm-eval lambada"] = timed(lambda: lm_eval.simple_evaluate(
                model=harness, tasks=[tasks_[0]], task_manager=manager, bootstrap_iters=0, verbosity="WARNING"))
            out["single flags"], seconds["one-at-a-time lambada"] = timed(
                lambda: one_at_a_time_lambada(model, tokenizer, passages_))
            out["nll"], seconds["megahf wikitext"] = timed(
                lambda: megahf_wikitext(model, tokenizer, text_, args.seq_length, overlap, args.micro_batch_size))
            out["lm wikitext"], seconds["lm-eval wikitext"] = timed(lambda: lm_eval.simple_evaluate(
                model=harness, tasks=[tasks_[1]], task_manager=manager, bootstrap_iters=0, verbosity="WARNING"))
            out["single nll"], seconds["one-at-a-time wikitext"] = timed(
                lambda: one_at_a_time_wikitext(model, tokenizer, text_, args.seq_length, overlap))
            flags_ = out["flags"]
            if flags_ != out["single flags"]:
                raise SystemExit("megahf's LAMBADA verdicts differ from the one-at-a-time loop's")
            lm_acc_ = out["lm lambada"]["results"]["lambada_openai_local"]["acc,none"]
            if lm_acc_ != sum(flags_) / len(flags_):
                raise SystemExit(f"lm-eval's acc {lm_acc_} != megahf's accuracy {sum(flags_) / len(flags_)}")
            if abs(out["nll"] - out["single nll"]) > 1e-5 * abs(out["single nll"]):
                raise SystemExit(f"megahf's summed NLL {out['nll']} differs from the one-at-a-time loop's "
                                 f"{out['single nll']}")
            return seconds, out

        # warm-up (not timed): a few passages and the text's first lines through every path
        warm_passages, warm_text = Path(tmp) / "warm.jsonl", Path(tmp) / "warm-text.jsonl"
        warm_passages.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages[:8]), encoding="utf-8")
        short = "".join(text.splitlines(keepends=True)[:40])
        warm_text.write_text(json.dumps({"page": short}) + "\n", encoding="utf-8")
        one_round(passages[:8], short, lm_eval_tasks(warm_passages, warm_text))

        times: dict[str, list[float]] = {}
        for round_ in range(args.rounds):
            seconds, out = one_round(passages, text, tasks)
            for key, value in seconds.items():
                times.setdefault(key, []).append(value)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()),
                  file=sys.stderr, flush=True)
        flags, nll, single_nll = out["flags"], out["nll"], out["single nll"]
        lm_acc = out["lm lambada"]["results"]["lambada_openai_local"]["acc,none"]
        lm_wikitext = out["lm wikitext"]
        # passage by passage against lm-eval (untimed: logging the samples is not what its users time)
        logged = lm_eval.simple_evaluate(model=harness, tasks=[tasks[0]], task_manager=manager, bootstrap_iters=0,
                                         verbosity="WARNING", log_samples=True)["samples"]["lambada_openai_local"]
        lm_flags = [bool(sample["acc"]) for sample in sorted(logged, key=lambda sample: sample["doc_id"])]
        differ = [i for i, (mine, theirs) in enumerate(zip(flags, lm_flags)) if mine != theirs]
        if len(lm_flags) != len(flags) or differ:
            raise SystemExit(f"lm-eval's LAMBADA verdicts differ from megahf's on passages {differ[:20]} "
                             f"({len(lm_flags)} vs {len(flags)} passages)")
        if not 0 < sum(flags) < len(flags):
            raise SystemExit(f"megahf's LAMBADA accuracy is {sum(flags)}/{len(flags)}: the paths cannot disagree on "
                             "such a model; raise --fit-steps")

    say(f"load average after: {os.getloadavg()[0]:.2f}")
    say(f"agreement: LAMBADA accuracy {sum(flags) / len(flags):.4f} ({sum(flags)}/{len(flags)} passages) in all "
        f"three (lm-eval acc {lm_acc:.4f}), the same verdict on every passage in all three; "
        f"WikiText summed NLL megahf {nll:.6f}, one at a time {single_nll:.6f} (lm-eval's word perplexity "
        f"{lm_wikitext['results']['wikitext_local']['word_perplexity,none']:.4g}: other windows and units)")
    say()
    median = {key: statistics.median(values) for key, values in times.items()}
    say(f"{'path':<24} {'median s':>9} {'min s':>8} {'max s':>8} {'throughput':>18}")
    for key, values in times.items():
        amount, unit = (len(passages), "passages/s") if key.endswith("lambada") else (num_tokens, "tokens/s")
        say(f"{key:<24} {median[key]:>9.3f} {min(values):>8.3f} {max(values):>8.3f} "
            f"{amount / median[key]:>8.1f} {unit}")
    say()
    for task in ("lambada", "wikitext"):
        for peer in ("lm-eval", "one-at-a-time"):
            say(f"{task}: megahf / {peer} = {median[f'{peer} {task}'] / median[f'megahf {task}']:.2f}x "
                "(throughput ratio of the medians, > 1: megahf faster)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
