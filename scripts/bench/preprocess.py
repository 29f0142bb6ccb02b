"""Benchmark `megahf preprocess` against the naive `datasets.map` + numpy route, in one run.

    python scripts/bench/preprocess.py [--megabytes 4] [--repeats 3]

Builds a corpus by repeating megahf's shipped Shakespeare jsonl to about --megabytes MB, then
times, each --repeats times (best kept), end to end from the jsonl to a token file on disk:

* megahf preprocess_corpus with --workers 1 and --workers 2 (GPT-2 tokenizer, --append-eod);
* the baseline: datasets.load_dataset("json") + Dataset.map(batched=True) with the same fast
  tokenizer (+ eos per document), then np.concatenate + ndarray.tofile (no index file); with
  num_proc=1 and num_proc=2. Each repeat gets a fresh datasets cache, so nothing is reused.

Every route loads its tokenizer inside the timed region (a fresh GPT-2 tokenizer has a cold BPE
word cache; reusing a warm one would favour whichever route ran second).

It checks that every route wrote the same tokens, and prints a table of tokens/s (wall clock)
and the ratio of each route to the single-process baseline, plus the CPU seconds each route
burnt (this process, its threads and its reaped child processes), which moves less than wall
time on a shared machine; the load average is printed so a busy machine shows. TOKENIZERS_PARALLELISM is reported: when unset,
the Rust tokenizer batches over all cores in single-process runs (megahf's worker processes are
always single-threaded).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

from tee import Tee


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def build_corpus(path: str, megabytes: float) -> int:
    from megahf.assets import corpus_path

    with open(corpus_path(), "rb") as f:
        one = f.read()
    copies = max(1, round(megabytes * 1e6 / len(one)))
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(one)
    return copies


def run_megahf(corpus: str, out_dir: str, workers: int) -> np.ndarray:
    from megahf.data import IndexedDataset
    from megahf.data.preprocess import preprocess_corpus

    res = preprocess_corpus(corpus, os.path.join(out_dir, "my"), tokenizer="gpt2", append_eod=True,
                            workers=workers, progress=False)
    ds = IndexedDataset(res.prefixes["text"])  # validates the pair; the .bin is every token in order
    return np.fromfile(res.prefixes["text"] + ".bin", dtype=ds.dtype)


def run_baseline(corpus: str, out_dir: str, num_proc: int) -> np.ndarray:
    import datasets

    from megahf.assets import load_gpt2_tokenizer

    tok = load_gpt2_tokenizer()  # loaded inside the timed region, as megahf preprocess does
    eos = tok.eos_token_id
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=os.path.join(out_dir, "cache"))

    def encode(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids if x]}

    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                num_proc=num_proc if num_proc > 1 else None)
    tokens = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ds["input_ids"]])
    tokens.tofile(os.path.join(out_dir, "baseline.bin"))
    return tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=float, default=4.0, help="corpus size to build (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per route, best kept (default 3)")
    p.add_argument("--out", default=None, help="also write the output to this file (with the command line first)")
    args = p.parse_args(argv)
    if args.out:
        sys.stdout = Tee(sys.stdout, args.out)
        print(f"$ python {' '.join(sys.argv)}")

    warnings.filterwarnings("ignore")
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    root = tempfile.mkdtemp(prefix="megahf-bench-preprocess-")
    try:
        corpus = os.path.join(root, "corpus.jsonl")
        copies = build_corpus(corpus, args.megabytes)
        size_mb = os.path.getsize(corpus) / 1e6
        routes = [
            ("megahf preprocess, 1 worker", lambda d: run_megahf(corpus, d, 1)),
            ("megahf preprocess, 2 workers", lambda d: run_megahf(corpus, d, 2)),
            ("datasets.map + np.tofile (baseline)", lambda d: run_baseline(corpus, d, 1)),
            ("datasets.map num_proc=2 + np.tofile", lambda d: run_baseline(corpus, d, 2)),
        ]
        best = {name: float("inf") for name, _ in routes}
        cpu = {name: float("inf") for name, _ in routes}
        load0 = os.getloadavg()[0]
        tokens = {}
        for r in range(args.repeats):
            for name, fn in routes:  # interleaved, so drift hits every route alike
                d = os.path.join(root, f"run{r}-{len(tokens)}-{abs(hash(name))}")
                os.makedirs(d)
                c0 = _cpu_seconds()
                t0 = time.perf_counter()
                out = fn(d)
                best[name] = min(best[name], time.perf_counter() - t0)
                cpu[name] = min(cpu[name], _cpu_seconds() - c0)
                tokens[name] = out
                shutil.rmtree(d)
        ref = tokens[routes[0][0]]
        same = all(np.array_equal(ref, t) for t in tokens.values())
        base = best[routes[2][0]]
        n = int(ref.size)
        print(f"corpus: shipped Shakespeare jsonl x {copies} = {size_mb:.2f} MB, {n:,} GPT-2 tokens (+eod); "
              f"{os.cpu_count()} CPUs; TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}; "
              f"best of {args.repeats}; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
        print(f"identical tokens across routes: {'yes' if same else 'NO'}")
        w = max(len(name) for name, _ in routes)
        print(f"{'route':<{w}}  {'seconds':>8}  {'tokens/s':>11}  {'vs baseline':>11}  {'CPU s':>7}")
        for name, _ in routes:
            s = best[name]
            print(f"{name:<{w}}  {s:8.2f}  {n / s:11,.0f}  {base / s:10.2f}x  {cpu[name]:7.2f}")
        sys.stdout.flush()
        return 0 if same else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
