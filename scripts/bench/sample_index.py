#!/usr/bin/env python
"""Benchmark megahf's numpy index builders against Megatron-Core's compiled helpers, and the
random read time of a sample.

    python scripts/bench/sample_index.py                      # 10^6 documents, ~10^9 tokens
    python scripts/bench/sample_index.py --docs 100000 --read-docs 20000 --blend-size 1000000

1. GPT sample index: ``megahf.data.sample_index.build_sample_index`` vs
   ``helpers_cpp.build_sample_idx_int32/64`` (what ``megatron.core.datasets.helpers.build_sample_idx``
   calls) on synthetic document lengths (lognormal, sigma 1, mean ``--mean-length``), one
   shuffled epoch, ``--seq-length`` 2048; both in the same process, alternated, best of
   ``--repeats``; the outputs are checked equal.
2. Blending index: ``build_blending_indices`` vs ``helpers_cpp.build_blending_indices`` for a
   blend of ``--blend-size`` samples over 3 and 10 sources.
3. Random sample read: a corpus of ``--read-docs`` documents written to a temporary folder,
   ``--reads`` random samples read through megahf's GPTDataset (``get_tokens`` and
   ``dataset[i]``) and Megatron-Core's (``_query_document_sample_shuffle_indices`` and
   ``dataset[i]`` without the attention mask), microseconds per sample.

Needs megatron-core (``pip install --no-deps megatron-core==0.16.1``) for the comparisons; with
``--no-megatron`` (or without it installed) only megahf's times are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

from megahf.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from megahf.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megahf.data.sample_index import build_blending_indices, build_sample_index
from tee import Tee


def load_megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from megatron.core.datasets import helpers_cpp
        except Exception as err:  # pragma: no cover - optional
            print(f"(megatron-core not available: {err}; megahf only)", file=sys.stderr)
            return None
    return helpers_cpp


def timed(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, times


def synthetic_lengths(num_docs, mean_length, seed=0):
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean_length) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2/2)
    return np.maximum(1, rng.lognormal(mu, sigma, num_docs)).astype(np.int32)


def bench_sample_index(args, helpers_cpp, rows):
    sizes = synthetic_lengths(args.docs, args.mean_length)
    tokens = int(sizes.sum(dtype=np.int64))
    doc_index = np.arange(args.docs, dtype=np.int32)
    np.random.RandomState(1234).shuffle(doc_index)
    seq = args.seq_length

    def ours():
        return build_sample_index(sizes, doc_index, seq, 1, tokens, True, True)

    def theirs():
        big = max(doc_index.shape[0], int(sizes.max())) > np.iinfo(np.int32).max
        fn = helpers_cpp.build_sample_idx_int64 if big else helpers_cpp.build_sample_idx_int32
        return fn(sizes, doc_index, seq, 1, tokens, True, 1)

    t_ours, t_theirs = [], []
    ref = got = None
    for _ in range(args.repeats):  # alternate, so that both see the same machine load
        got, t = timed(ours, 1)
        t_ours += t
        if helpers_cpp is not None:
            ref, t = timed(theirs, 1)
            t_theirs += t
    label = f"sample index: {args.docs:,} docs, {tokens / 1e9:.3g}e9 tokens, seq {seq} ({got.shape[0] - 1:,} samples)"
    if helpers_cpp is not None:
        assert ref.dtype == got.dtype and np.array_equal(ref, got), "megahf's sample index differs from helpers_cpp"
    rows.append((label, t_ours, t_theirs, "ms"))


def bench_blending(args, helpers_cpp, rows):
    rng = np.random.default_rng(0)
    for num in (3, 10):
        raw = rng.random(num) + 0.05
        weights = (raw / raw.sum()).tolist()
        size = args.blend_size

        def theirs():
            a = np.zeros(size, np.int16)
            b = np.zeros(size, np.int64)
            helpers_cpp.build_blending_indices(a, b, weights, num, size, False)
            return a, b

        t_ours, t_theirs = [], []
        got = ref = None
        for _ in range(max(1, args.repeats // 2)):
            got, t = timed(lambda: build_blending_indices(weights, size), 1)
            t_ours += t
            if helpers_cpp is not None:
                ref, t = timed(theirs, 1)
                t_theirs += t
        if helpers_cpp is not None:
            assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]), "blending differs"
        rows.append((f"blending index: {num} sources, {size:,} samples", t_ours, t_theirs, "ms"))


class _Tok:
    vocab_size = 50257
    eod = 50256
    pad = 50255
    unique_identifiers = {"class": "bench"}


def bench_reads(args, use_megatron, rows):
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "corpus")
        lengths = synthetic_lengths(args.read_docs, args.mean_length, seed=1)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        chunk = 20000
        for lo in range(0, lengths.shape[0], chunk):
            part = lengths[lo : lo + chunk]
            builder.add_documents(
                rng.integers(0, 50000, int(part.sum()), dtype=np.uint16), part, np.ones(part.shape[0], np.int64)
            )
        builder.finalize(prefix + ".idx")
        indexed = IndexedDataset(prefix)
        n = len(indexed)
        cfg = GPTDatasetConfig(seq_length=args.seq_length, seed=1234, split="1")
        ours = GPTDataset(indexed, range(0, n), None, cfg, "train")
        picks = rng.integers(0, len(ours), args.reads)

        def per_sample(fn):
            best = []
            for _ in range(3):
                t = time.perf_counter()
                for i in picks:
                    fn(int(i))
                best.append((time.perf_counter() - t) / len(picks))
            return best

        theirs = None
        if use_megatron:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from megatron.core.datasets import gpt_dataset as MG
                from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed
                from megatron.core.datasets.utils import Split

                mcfg = MG.GPTDatasetConfig(
                    random_seed=1234,
                    sequence_length=args.seq_length,
                    blend=([prefix], None),
                    split="1",
                    path_to_cache=os.path.join(tmp, "cache"),
                    tokenizer=_Tok(),
                    reset_position_ids=False,
                    reset_attention_mask=False,
                    eod_mask_loss=False,
                    create_attention_mask=False,
                )
                theirs = MG.GPTDataset(MIndexed(prefix), prefix, np.arange(n, dtype=np.int32), None, Split.train, mcfg)
            for i in picks[:200]:
                assert np.array_equal(ours.get_tokens(int(i)), theirs._query_document_sample_shuffle_indices(int(i))[0])
        label = f"random sample read ({args.seq_length + 1} tokens, {args.read_docs:,} docs)"
        rows.append(
            (
                label + ": tokens",
                per_sample(ours.get_tokens),
                per_sample(lambda i: theirs._query_document_sample_shuffle_indices(i)) if theirs else [],
                "us",
            )
        )
        rows.append(
            (
                label + ": dataset[i]",
                per_sample(ours.__getitem__),
                per_sample(theirs.__getitem__) if theirs else [],
                "us",
            )
        )
        del ours, theirs, indexed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=1_000_000, help="documents for the sample index (default 10^6)")
    p.add_argument("--mean-length", type=float, default=1000.0, help="mean document length (default 1000)")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--blend-size", type=int, default=2_000_000, help="samples of the blend (0 skips)")
    p.add_argument("--read-docs", type=int, default=100_000, help="documents of the read corpus (0 skips)")
    p.add_argument("--reads", type=int, default=20_000)
    p.add_argument("--no-megatron", action="store_true")
    p.add_argument("--out", default=None, help="also write the output to this file (with the command line first)")
    args = p.parse_args(argv)
    if args.out:
        sys.stdout = Tee(sys.stdout, args.out)
        print(f"$ python {' '.join(sys.argv)}")
        print(f"1-minute load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")

    helpers_cpp = None if args.no_megatron else load_megatron()
    rows = []
    bench_sample_index(args, helpers_cpp, rows)
    if args.blend_size > 0:
        bench_blending(args, helpers_cpp, rows)
    if args.read_docs > 0:
        bench_reads(args, helpers_cpp is not None, rows)

    scale = {"ms": 1e3, "us": 1e6}
    print(f"\nnumpy {np.__version__}, {os.cpu_count()} CPUs; best (median) of the repeats\n")
    print("| what | megahf (numpy) | Megatron-Core | megahf / Megatron |")
    print("|---|---|---|---|")
    for label, ours, theirs, unit in rows:
        k = scale[unit]
        o = f"{min(ours) * k:.3g} {unit} ({statistics.median(ours) * k:.3g})"
        if theirs:
            t = f"{min(theirs) * k:.3g} {unit} ({statistics.median(theirs) * k:.3g})"
            r = f"{min(ours) / min(theirs):.2f}x"
        else:
            t = r = "-"
        print(f"| {label} | {o} | {t} | {r} |")
    print(f"1-minute load average after: {os.getloadavg()[0]:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
