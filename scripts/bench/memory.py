"""Activation memory under tensor parallelism, sequence parallelism and recomputation, counted exactly, beside the
formulas of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models").

For a small GPT-2-shaped MegatronGPT at sequence 1024 (bf16 weights and activations: the paper's 16-bit setting,
dropout 0.1 on the attention probabilities and the hidden states, as in the paper) this counts, on each rank:

* the bytes autograd keeps for the backward pass: every tensor saved for backward passes through a saved-tensor
  hook (`torch.autograd.graph.saved_tensors_hooks`), which records its storage (once, however many ops save it;
  parameters excluded); a checkpoint (recomputation) keeps its inputs instead of what runs inside it, and those
  are recorded by wrapping the checkpoint function. Each storage is charged to the layer running when it is first
  saved (a layer is charged for its own input, as in the paper); "per layer" is the mean over layers 1..L-1
  (layer 0 also holds what every layer shares, such as the attention mask);
* the bytes of parameters, gradients and AdamW moments after one optimizer step (bf16 here: 8 bytes per
  parameter; Megatron's mixed precision adds fp32 master weights, the ratios between layouts are the same).

Layouts: TP=1 (one process), TP=2 and TP=2 + sequence parallel (two processes, gloo), each with recompute none,
selective (the attention core) and full (every layer), with eager attention (the paper's: the a*s*s scores,
softmax, dropout mask and probabilities are kept) and sdpa. Beside each measured figure: the paper's per-layer
formula (Section 4: s*b*h*(34 + 5*a*s/h) without parallelism; 10 + 24/t + 5as/(ht) with TP; (34 + 5as/h)/t with
TP+SP; 34 (/t) with selective recomputation; 2 (/t) for full) and their ratio.

Then the step time of each recompute mode against none (TP=1, eager; timing, unlike the counts: median of --reps
steps; run it on a quiet machine if you can).

    python scripts/bench/memory.py [--seq 1024 --hidden 512 --heads 8 --layers 3 --reps 3] [--out DIR]

Writes memory.json (every figure) and memory.txt (the table) under --out (default scripts/bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

RECOMPUTES = ("none", "selective", "full")
ATTENTIONS = ("eager", "sdpa")
LAYOUTS = {"tp1": (1, False), "tp2": (2, False), "tp2+sp": (2, True)}


# ---------------------------------------------------------------------- the paper's formulas (bytes per layer)


def formula(s: int, b: int, h: int, a: int, t: int, sp: bool, recompute: str) -> float:
    """Per-layer activation bytes of Korthikanti et al. 2022, Section 4 (16-bit activations, 1-byte masks)."""
    attention_core = 5 * a * s / h  # scores + softmax output (2 bytes each), dropout mask (1), probabilities (2)
    if recompute == "full":
        per = 2.0 / (t if sp else 1)  # only the layer's input
    elif sp:
        per = (34 + (0 if recompute == "selective" else attention_core)) / t
    else:
        # 10 sbh outside the TP regions (two norms' inputs 4, two dropout masks 2, qkv and fc1 inputs 4), the rest / t
        per = 10 + (24 + (0 if recompute == "selective" else attention_core)) / t
    return s * b * h * per


def implementation_formula(s: int, b: int, h: int, a: int, t: int, sp: bool, recompute: str,
                           attention: str) -> float | None:
    """The same count for this implementation, term by term from its operations (bf16 on CPU), where it keeps more
    than the paper assumes: a dropout mask is kept as a 2-byte bf16 tensor, not 1 byte (+1 sbh per hidden dropout,
    +1 a s^2 b for the attention's); transformers' eager attention keeps the softmax output in fp32 (+2 a s^2 b);
    q is a view that keeps the whole 6-byte QKV output alive, and the two batched matmuls keep copies of k^T and v
    (+4 sbh). Outside the TP regions: two norm inputs (4), two masks (4), the qkv and fc1 inputs (4) = 12; inside:
    q/k/v (10), the proj input (2), gelu's input (8), fc2's input (8) = 28; the attention core 8 a s / h (eager).
    None for sdpa's core, which the CPU kernels keep in their own way."""
    if recompute == "full":
        return s * b * h * 2.0 / (t if sp else 1)
    if recompute == "none" and attention != "eager":
        return None
    core = 0 if recompute == "selective" else 8 * a * s / h
    per = (12 + 28 + core) / t if sp else 12 + (28 + core) / t
    return s * b * h * per


# ---------------------------------------------------------------------- counting


class SavedBytes:
    """Storages autograd keeps for the backward pass, charged to the layer running when first saved."""

    def __init__(self, model):
        from torch.distributed.tensor import DTensor

        self.DTensor = DTensor
        self.params = {self._storage(p) for p in model.parameters()}
        self.seen: set[int] = set()
        self.by_layer: dict[str, int] = {}
        self.current = "outside"

    def _storage(self, t: torch.Tensor) -> int:
        if isinstance(t, self.DTensor):
            t = t._local_tensor
        return t.untyped_storage().data_ptr()

    def record(self, t: torch.Tensor) -> None:
        if isinstance(t, self.DTensor):
            t = t._local_tensor
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.params or key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        self.by_layer[self.current] = self.by_layer.get(self.current, 0) + storage.nbytes()

    def pack(self, t):
        self.record(t)
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def watch_layers(self, layers) -> None:
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "current", f"layer{i}"))
            layer.register_forward_hook(lambda m, a, o: setattr(self, "current", "outside"))

    def counting_checkpoint(self, original):
        """A checkpoint keeps its inputs (also those bound into a partial) for the recomputation."""

        def checkpoint(function, *args, **kwargs):
            for value in (*args, *kwargs.values(), *getattr(function, "keywords", {}).values()):
                if isinstance(value, torch.Tensor):
                    self.record(value)
            return original(function, *args, **kwargs)

        return checkpoint


def build_model(args, attention: str, recompute: str, tp: int, sp: bool):
    import megahf  # noqa: F401  (registers the models and megahf's parallel styles)
    from megahf import MegatronGPTConfig, MegatronGPTForCausalLM
    from megahf.parallel import distribute_model
    from megahf.parallel.rng import checkpoint_context
    from transformers.distributed import DistributedConfig

    config = MegatronGPTConfig.from_preset(
        "gpt-tiny", hidden_size=args.hidden, num_attention_heads=args.heads, num_layers=args.layers,
        ffn_hidden_size=4 * args.hidden, max_position_embeddings=args.seq, attention_dropout=0.1, hidden_dropout=0.1,
        attn_implementation=attention, recompute_granularity="selective" if recompute == "selective" else None)
    torch.manual_seed(0)
    model = MegatronGPTForCausalLM(config).to(torch.bfloat16)
    if tp > 1:
        model = distribute_model(model, DistributedConfig(tp_size=tp, enable_sequence_parallel=sp))
    if recompute == "full":
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context})
    return model.train()


def local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t._local_tensor
    return t.numel() * t.element_size()


def measure(args, attention: str, recompute: str, tp: int, sp: bool) -> dict:
    import megahf.models.layers as layers_module
    import transformers.modeling_utils as modeling_utils

    counter_holder = {}
    originals = (layers_module.checkpoint, modeling_utils.checkpoint)
    model = None
    try:
        # Wrap the checkpoint functions before the model binds them (full recompute binds it when enabled).
        counter_holder["c"] = None

        def wrapped(original):
            def checkpoint(function, *a, **k):
                return counter_holder["c"].counting_checkpoint(original)(function, *a, **k)
            return checkpoint

        layers_module.checkpoint = wrapped(originals[0])
        modeling_utils.checkpoint = wrapped(originals[1])
        model = build_model(args, attention, recompute, tp, sp)
        counter = counter_holder["c"] = SavedBytes(model)
        counter.watch_layers(model.model.decoder.layers)
        generator = torch.Generator().manual_seed(1)
        input_ids = torch.randint(0, 50257, (args.batch, args.seq), generator=generator)
        torch.manual_seed(2)
        with counter.hooks():
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        optimizer.step()
        params = sum(local_bytes(p) for p in model.parameters())
        grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        moments = sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                      if isinstance(v, torch.Tensor) and v.dim() > 0)
        layer_bytes = [counter.by_layer.get(f"layer{i}", 0) for i in range(args.layers)]
        return {"per_layer": statistics.mean(layer_bytes[1:]), "layers": layer_bytes,
                "outside_layers": counter.by_layer.get("outside", 0), "total": sum(counter.by_layer.values()),
                "params": params, "grads": grads, "optimizer": moments, "loss": loss.item()}
    finally:
        layers_module.checkpoint, modeling_utils.checkpoint = originals


def step_times(args) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of a training step per recompute mode (TP=1, eager), the modes taking turns (none,
    selective, full, none, ...) after one warm-up step each, so that the machine's drifts hit every mode alike. CPU
    time (this process's) is what other processes on the machine disturb least."""
    input_ids = torch.randint(0, 50257, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    runs = {}
    for recompute in RECOMPUTES:
        model = build_model(args, "eager", recompute, 1, False)
        runs[recompute] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times = {recompute: {"wall": [], "cpu": []} for recompute in RECOMPUTES}
    for i in range(args.reps + 1):
        for recompute, (model, optimizer) in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            model(input_ids=input_ids, labels=input_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i:  # the first round warms up
                times[recompute]["wall"].append(time.perf_counter() - wall)
                times[recompute]["cpu"].append(time.process_time() - cpu)
    return times


def run_layouts(args, tp: int, rank: int) -> dict:
    results = {}
    for name, (layout_tp, sp) in LAYOUTS.items():
        if layout_tp != tp:
            continue
        for attention in ATTENTIONS:
            for recompute in RECOMPUTES:
                results[f"{name}/{attention}/{recompute}"] = measure(args, attention, recompute, layout_tp, sp)
                if rank == 0:
                    print(f"  measured {name} {attention} {recompute}", file=sys.stderr, flush=True)
    return results


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = run_layouts(args, world, rank)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        # Every rank holds the same amounts (equal shards); keep rank 0's and check the others agree.
        for other in gathered[1:]:
            for key, value in other.items():
                if value["per_layer"] != results[key]["per_layer"]:
                    results[key]["per_layer_other_rank"] = value["per_layer"]
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(args, results: dict, times: dict, load: tuple[float, ...]) -> str:
    s, b, h, a = args.seq, args.batch, args.hidden, args.heads
    lines = [f"MegatronGPT (GPT-2 shape) hidden {h}, {a} heads, {args.layers} layers, seq {s}, micro-batch {b}, "
             f"bf16, dropout 0.1; torch {torch.__version__}; sbh = {s * b * h:,} elements",
             "", "Activation bytes saved for backward per layer and rank (measured) vs the paper's formula:",
             f"{'layout':8} {'attention':9} {'recompute':9} {'measured':>12} {'paper':>12} {'meas/paper':>10} "
             f"{'as built':>12} {'meas/built':>10} {'/ sbh':>7} {'vs tp1':>7}"]
    for key, value in results.items():
        layout, attention, recompute = key.split("/")
        t, sp = LAYOUTS[layout]
        expected = formula(s, b, h, a, t, sp, recompute)
        base = results[f"tp1/{attention}/{recompute}"]["per_layer"]
        built = implementation_formula(s, b, h, a, t, sp, recompute, attention)
        value["formula"], value["implementation_formula"] = expected, built
        built_text = (f"{built:>12,.0f} {value['per_layer'] / built:>10.3f}" if built else f"{'-':>12} {'-':>10}")
        lines.append(f"{layout:8} {attention:9} {recompute:9} {value['per_layer']:>12,.0f} {expected:>12,.0f} "
                     f"{value['per_layer'] / expected:>10.3f} {built_text} {value['per_layer'] / (s * b * h):>7.2f} "
                     f"{value['per_layer'] / base:>7.3f}")
    lines += ["", "Goals:"]
    pgo = {k: v["params"] + v["grads"] + v["optimizer"] for k, v in results.items()}
    ratio = pgo["tp2/eager/none"] / pgo["tp1/eager/none"]
    lines.append(f"  parameter + gradient + optimizer bytes per rank: TP=1 {pgo['tp1/eager/none']:,}, TP=2 "
                 f"{pgo['tp2/eager/none']:,}: ratio {ratio:.3f} (goal <= 0.55)")
    sp_sel = results["tp2+sp/eager/selective"]["per_layer"] / results["tp2/eager/none"]["per_layer"]
    lines.append(f"  activations per layer, TP=2 + SP + selective vs TP=2 (eager): {sp_sel:.3f} (goal <= 0.35; "
                 f"formula {formula(s, b, h, a, 2, True, 'selective') / formula(s, b, h, a, 2, False, 'none'):.3f})")
    sdpa = results["tp2+sp/sdpa/selective"]["per_layer"] / results["tp2/sdpa/none"]["per_layer"]
    lines.append(f"  the same with sdpa attention: {sdpa:.3f}")
    lines += ["", f"Step time (TP=1, eager, forward + backward + AdamW; medians of {args.reps} rounds, the modes "
              f"taking turns; {torch.get_num_threads()} thread(s); load average before {load[0]:.2f}, after "
              f"{os.getloadavg()[0]:.2f}):"]
    for clock in ("wall", "cpu"):
        base = statistics.median(times["none"][clock])
        for recompute, values in times.items():
            median = statistics.median(values[clock])
            lines.append(f"  {clock:4} recompute {recompute:9} {median:7.3f} s  x{median / base:.3f} of none  "
                         f"(steps: {', '.join(f'{v:.3f}' for v in values[clock])})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per recompute mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", default=str(REPO / "scripts" / "bench" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    load = os.getloadavg()
    print("TP=1 ...", file=sys.stderr, flush=True)
    results = run_layouts(args, 1, 0)
    print("TP=2 (2 processes, gloo) ...", file=sys.stderr, flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".memory-tp2.partial.json"
    mp.spawn(_worker, args=(2, free_port(), args, str(partial)), nprocs=2, join=True)
    results.update(json.loads(partial.read_text()))
    partial.unlink()
    print("step times ...", file=sys.stderr, flush=True)
    times = step_times(args)

    text = report(args, results, times, load)
    print(text)
    from megahf.atomic import atomic_write_json, atomic_write_text

    # the output folder is left out of the record: it is where the file lies, and a machine path otherwise
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    atomic_write_json(out_dir / "memory.json", {"args": settings, "results": results, "step_times": times})
    atomic_write_text(out_dir / "memory.txt", text + "\n")


if __name__ == "__main__":
    main()
