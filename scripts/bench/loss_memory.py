#!/usr/bin/env python
"""Peak memory of the language-model loss (output layer + cross entropy, forward and backward): the plain path,
which holds the [tokens, vocabulary] logits, against the chunked one (`loss_chunk_size`), which never does.

Measured exactly, not sampled: torch's profiler with `profile_memory=True` records every allocation and every free
of torch's CPU allocator, with its size, in order; the peak is the largest running sum of those bytes over the
loss's forward and backward pass (what was allocated before it, the hidden states and the weight, is not counted;
the gradients it leaves behind are). Also printed: the bytes the loss saves for its backward pass
(`torch.autograd.graph.saved_tensors_hooks`, each storage once; the chunked loss saves none: it keeps the
gradients it computed in its forward pass, which the peak counts) and the largest single tensor it creates.

No timing: the numbers do not depend on the machine's load.

Usage (from the repository root):

    python scripts/bench/loss_memory.py                        # seq 1024, batch 8, hidden 512, vocab 50257, chunk 1024
    python scripts/bench/loss_memory.py --seq 2048 --chunk 512 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from megahf.models.chunked_loss import chunked_causal_lm_loss
from megahf.models.padded_vocab import causal_lm_loss

MiB = 2 ** 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50257, help="real vocabulary; the output layer is padded to 128")
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk (loss_chunk_size)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="hidden states and weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the JSON result to this path")
    return p.parse_args(argv)


class _Largest(TorchDispatchMode):
    """The largest tensor (bytes) any op creates."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def measure(loss_fn, hidden: torch.Tensor, layer: torch.nn.Module, labels: torch.Tensor) -> dict:
    """Peak allocator bytes, saved-for-backward bytes and the largest tensor of one forward + backward."""
    hidden.grad = layer.weight.grad = None
    gc.collect()
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with _Largest() as largest:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn(hidden, layer, labels)
            loss.backward()
        value = loss.item()
        del loss
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return {"loss": value, "peak_bytes": peak, "left_bytes": running, "saved_bytes": sum(saved.values()),
            "largest_tensor_bytes": largest.bytes, "allocator_events": len(events)}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    padded = int(math.ceil(args.vocab / 128) * 128)
    hidden = torch.randn(args.batch, args.seq, args.hidden, dtype=dtype).requires_grad_()
    layer = torch.nn.Linear(args.hidden, padded, bias=False, dtype=dtype)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    tokens = args.batch * args.seq

    def plain(h, m, y):
        return causal_lm_loss(m(h), y, vocab_size=args.vocab)

    def chunked(h, m, y):
        return chunked_causal_lm_loss(h, m, y, vocab_size=args.vocab, chunk_size=args.chunk)

    results = {"plain": measure(plain, hidden, layer, labels), "chunked": measure(chunked, hidden, layer, labels)}
    logits_bytes = tokens * padded * torch.finfo(dtype).bits // 8
    print(f"torch {torch.__version__}; loss forward + backward at seq {args.seq}, batch {args.batch} ({tokens} tokens), "
          f"hidden {args.hidden}, vocab {args.vocab} (output layer {padded} rows), {args.dtype}; chunk {args.chunk}")
    print(f"one copy of the logits [{tokens}, {padded}]: {logits_bytes / MiB:.1f} MiB")
    print(f"{'loss':<8} {'peak MiB':>10} {'saved MiB':>10} {'largest tensor MiB':>19} {'loss value':>12}")
    for name, r in results.items():
        print(f"{name:<8} {r['peak_bytes'] / MiB:>10.1f} {r['saved_bytes'] / MiB:>10.1f} "
              f"{r['largest_tensor_bytes'] / MiB:>19.1f} {r['loss']:>12.6f}")
    ratio = results["plain"]["peak_bytes"] / results["chunked"]["peak_bytes"]
    print("saved: tensors saved for backward; the chunked loss holds its gradients instead (counted in the peak)")
    print(f"peak memory ratio plain / chunked: {ratio:.2f}x (goal: >= 4x at seq 1024)")
    relative = abs(results["chunked"]["loss"] - results["plain"]["loss"]) / abs(results["plain"]["loss"])
    print(f"loss values agree to {relative:.1e} relative")
    record = {"benchmark": "megahf.loss_memory", "torch": torch.__version__, **vars(args), "padded_vocab": padded,
              "logits_bytes": logits_bytes, "results": results, "peak_ratio": ratio}
    print("JSON " + json.dumps(record, sort_keys=True))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
