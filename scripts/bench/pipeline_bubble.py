"""The pipeline bubble, measured: the idle fraction of each pipeline rank at PP=2 for m micro-batches, against
(p-1)/(m+p-1) for 1F1B and (p-1)/(v*m+p-1) for interleaved 1F1B with v stages per rank.

Two gloo processes (one torch thread each) build a GPT-2-shaped MegatronGPT as `megahf pretrain` does and run
`Pipeline.train_step` (`megahf.parallel.pipeline`) for each schedule and each m. Every forward, backward (full, or
input and weight apart under zero-bubble) of every stage is timed by wrapping the stage's `forward_one_chunk`,
`backward_one_chunk` and `backward_weight_one_chunk` (torch.distributed.pipelining's compute calls; the schedule
waits for its receives outside them). A rank's idle fraction is 1 - (its compute time) / (the step's wall time),
over the whole `train_step` (which after the schedule sums the tied embedding's two gradients and broadcasts the
loss) and over the schedule alone. The configurations take turns (A, B, C, A, B, C, ...) after a warm-up step each;
the figures are medians over the repetitions.

Beside the formula, a replay of the schedule's own action list (torch's `pipeline_order` for the interleaved
schedules; for 1F1B and GPipe the order their `_step_microbatches` runs) with the measured duration of each action
(each repetition's own, then the median) and free, instant communication: what the schedule would idle on these
stages (their real imbalance) with no p2p cost. The gap between the replay and the measurement is communication,
the schedule's own overhead and the machine's noise; the gap between the formula and the replay is the stages'
imbalance (the first holds the embedding, the last the output layer and the loss) and the spread of the durations.

The default vocabulary is small (1024) so that the two stages do nearly equal work; `--heavy-vocab 50257` adds 1F1B
at GPT-2's vocabulary, where the output layer makes the last stage the heavier.

    python scripts/bench/pipeline_bubble.py [--micro-batches 2,4,8 --reps 5] [--out DIR]

Writes pipeline_bubble.json and pipeline_bubble.txt under --out (default scripts/bench/results/). Timing: run it on
a quiet machine if you can; the load average before and after is in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

SCHEDULES = ("1f1b", "gpipe", "interleaved-1f1b", "interleaved-zb")
PP = 2


def formula(schedule: str, m: int, v: int) -> float | None:
    """The textbook bubble (equal stages, backward any multiple of forward, free communication)."""
    if schedule in ("1f1b", "gpipe"):
        return (PP - 1) / (m + PP - 1)
    if schedule == "interleaved-1f1b":
        return (PP - 1) / (v * m + PP - 1)
    return None  # zero-bubble: depends on the split of the backward; the replay gives this schedule's own


# ---------------------------------------------------------------------- timing the stages' compute


class ComputeClock:
    """Wall seconds of each compute call of this rank's stages, by (stage, action: F, B, I or W)."""

    def __init__(self, stages, device: torch.device):
        self.calls: dict[tuple[int, str], list[float]] = defaultdict(list)
        self.cpu = 0.0  # this thread's CPU seconds in the same calls: below their wall time when the OS runs others
        # on a GPU the kernels run after the call returns: wait for them (which serialises compute with the
        # NCCL transfers the schedule overlaps with it; the measured idle is then an upper bound)
        self.on_gpu = device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.on_gpu else (lambda: None)
        for stage in stages:
            self._wrap(stage, "forward_one_chunk", lambda *a, **k: "F")
            self._wrap(stage, "backward_one_chunk", lambda *a, **k: "B" if k.get("full_backward", True) else "I")
            self._wrap(stage, "backward_weight_one_chunk", lambda *a, **k: "W")

    def _wrap(self, stage, method: str, kind_of) -> None:
        original = getattr(stage, method)

        def timed(*args, **kwargs):
            self.sync()
            start, cpu = time.perf_counter(), time.thread_time()
            result = original(*args, **kwargs)
            self.sync()
            self.calls[stage.stage_index, kind_of(*args, **kwargs)].append(time.perf_counter() - start)
            self.cpu += time.thread_time() - cpu
            return result

        setattr(stage, method, timed)

    def take(self) -> tuple[dict[str, list[float]], float]:
        taken = {f"{stage}{kind}": values for (stage, kind), values in self.calls.items()}, self.cpu
        self.calls, self.cpu = defaultdict(list), 0.0
        return taken


def timed_method(obj, name: str, into: list) -> None:
    original = getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        into.append(time.perf_counter() - start)
        return result

    setattr(obj, name, timed)


def build(args, schedule: str, m: int, vocab: int, device: torch.device):
    import megahf  # noqa: F401  (registers the models)
    from megahf import MegatronGPTConfig, MegatronGPTForCausalLM
    from megahf.parallel.layout import resolve_layout
    from megahf.parallel.pipeline import build_pipeline

    v = args.virtual if schedule.startswith("interleaved") else 1
    layout = resolve_layout(world_size=PP, pipeline_parallel_size=PP, virtual_pipeline_size=v,
                            pipeline_schedule=schedule, micro_batch_size=args.micro_batch,
                            global_batch_size=args.micro_batch * m)
    config = MegatronGPTConfig.from_preset(
        "gpt-tiny", hidden_size=args.hidden, num_attention_heads=args.heads, num_layers=args.layers,
        ffn_hidden_size=4 * args.hidden, max_position_embeddings=args.seq, vocab_size=vocab)
    torch.manual_seed(0)
    model = MegatronGPTForCausalLM(config).train()
    pipeline = build_pipeline(model, layout, device)
    clock = ComputeClock(pipeline.stages, device)
    extra = {"schedule": [], "tied": []}
    timed_method(pipeline.schedule, "step", extra["schedule"])
    timed_method(pipeline, "_sum_tied_gradients", extra["tied"])
    ids = torch.randint(0, vocab, (args.micro_batch * m, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    if len(pipeline.stages) == 1:
        order = {rank: single_stage_order(schedule, rank, m) for rank in range(PP)}
    else:
        order = {rank: [str(a) for a in actions if a is not None]
                 for rank, actions in pipeline.schedule.pipeline_order.items()}
    return {"model": model, "pipeline": pipeline, "clock": clock, "extra": extra, "v": v, "order": order,
            "inputs": {"input_ids": ids, "labels": ids}}


def single_stage_order(schedule: str, rank: int, m: int) -> list[str]:
    """The compute order of a one-stage-per-rank schedule as its `_step_microbatches` runs it (torch's
    `pipeline_order` of Schedule1F1B, a drawing, numbers the last rank's micro-batches from 1): GPipe all forwards
    then all backwards; 1F1B min(m, p - rank) forwards, then a backward and a forward in turn, then the backwards."""
    if schedule == "gpipe":
        return [f"{rank}F{i}" for i in range(m)] + [f"{rank}B{i}" for i in range(m)]
    warmup = min(m, PP - rank)
    order = [f"{rank}F{i}" for i in range(warmup)]
    forward = warmup
    for backward in range(m):
        order.append(f"{rank}B{backward}")
        if forward < m:
            order.append(f"{rank}F{forward}")
            forward += 1
    return order


def run_once(run) -> dict:
    run["clock"].sync()
    dist.barrier()  # both ranks start the step together
    start = time.perf_counter()
    with torch.autocast("cuda", torch.bfloat16, enabled=run["clock"].on_gpu):  # as the Trainer trains on a GPU
        run["pipeline"].train_step(run["inputs"])
    run["clock"].sync()
    wall = time.perf_counter() - start
    for param in run["model"].parameters():
        param.grad = None
    extra = run["extra"]
    compute, cpu = run["clock"].take()
    record = {"wall": wall, "schedule": extra["schedule"].pop(), "tied": sum(extra["tied"]), "compute": compute,
              "compute_cpu": cpu}
    extra["tied"].clear()
    return record


def configurations(args) -> list[tuple[str, int, int]]:
    runs = [(schedule, m, args.vocab) for schedule in args.schedules.split(",") for m in args.micro_batches]
    if args.heavy_vocab:
        runs += [("1f1b", m, args.heavy_vocab) for m in args.micro_batches]
    return runs


def _worker(rank: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(PP),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(PP))
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=PP,
                            device_id=device if args.device == "cuda" else None)
    runs = {key: build(args, *key, device) for key in configurations(args)}
    records = {key: [] for key in runs}
    for repetition in range(args.reps + 1):
        for key, run in runs.items():
            record = run_once(run)
            if repetition:  # the first round warms up
                records[key].append(record)
        if rank == 0:
            print(f"  round {repetition}/{args.reps} done", file=sys.stderr, flush=True)
    mine = {"|".join(map(str, key)): {"records": records[key], "order": runs[key]["order"][rank], "v": runs[key]["v"]}
            for key in runs}
    gathered = [None] * PP
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


# ---------------------------------------------------------------------- analysis


def replay(orders: list[list[str]], duration: dict[str, float], num_stages: int) -> tuple[float, list[float]]:
    """The schedule's action lists run with the given durations and instant communication: (makespan, busy time of
    each rank). An action waits for its rank's previous action and for the one it needs: a forward for the previous
    stage's forward of its micro-batch, a backward (full or input) for the next stage's, a weight backward for its
    own input backward."""
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, micro-batch) -> end
    position, free = [0] * len(orders), [0.0] * len(orders)
    busy = [0.0] * len(orders)
    parsed = [[_parse(a) for a in order] for order in orders]
    parsed = [[a for a in order if a is not None] for order in parsed]
    progress = True
    while progress:
        progress = False
        for rank, order in enumerate(parsed):
            while position[rank] < len(order):
                stage, kind, mb = order[position[rank]]
                if kind == "F":
                    need = [("F", stage - 1, mb)] if stage > 0 else []
                elif kind in "BI":
                    need = [("F", stage, mb)] + ([("BI", stage + 1, mb)] if stage < num_stages - 1 else [])
                else:
                    need = [("I", stage, mb)]
                ready = []
                for need_kind, need_stage, need_mb in need:
                    ends = [done[k, need_stage, need_mb] for k in need_kind if (k, need_stage, need_mb) in done]
                    if not ends:
                        break
                    ready.append(ends[0])
                else:
                    start = max([free[rank]] + ready)
                    cost = duration[f"{stage}{kind}"]
                    free[rank] = start + cost
                    busy[rank] += cost
                    done[kind, stage, mb] = free[rank]
                    # a full backward stands for both halves where a later action asks for one of them
                    if kind == "B":
                        done["I", stage, mb] = free[rank]
                    position[rank] += 1
                    progress = True
                    continue
                break
    if any(p < len(order) for p, order in zip(position, parsed)):
        raise RuntimeError("the replay of the schedule's actions is stuck: a dependency rule is wrong")
    return max(free), busy


def _parse(action: str) -> tuple[int, str, int] | None:
    """torch's action string, e.g. '1F3' (stage 1, forward, micro-batch 3), to (stage, kind, micro-batch); None for
    what is not compute (gradient reductions, FSDP's unshard and reshard)."""
    for kind in "FBIW":
        stage, sep, mb = action.partition(kind)
        if sep and stage.isdigit() and mb.isdigit():
            return int(stage), kind, int(mb)
    return None


def analyse(gathered: list[dict], key: str) -> dict:
    schedule, m, vocab = key.split("|")
    m = int(m)
    v = gathered[0][key]["v"]
    num_stages = PP * v
    reps = len(gathered[0][key]["records"])
    per_rank = []
    medians: dict[str, float] = {}
    for rank, mine in enumerate(gathered):
        records = mine[key]["records"]
        compute = [sum(sum(values) for values in r["compute"].values()) for r in records]
        idle = [1 - c / r["wall"] for c, r in zip(compute, records)]
        idle_schedule = [1 - c / r["schedule"] for c, r in zip(compute, records)]
        for name in records[0]["compute"]:
            # the median over repetitions of the mean duration of this action in the step
            medians[name] = statistics.median(statistics.mean(r["compute"][name]) for r in records)
        per_rank.append({
            "idle_step": statistics.median(idle), "idle_step_all": idle,
            "idle_schedule": statistics.median(idle_schedule),
            "wall": statistics.median(r["wall"] for r in records),
            "compute": statistics.median(compute),
            "compute_cpu_share": statistics.median(r["compute_cpu"] / c for c, r in zip(compute, records)),
            "tied": statistics.median(r["tied"] for r in records)})
    # each repetition replayed with its own durations (the mean of each action in that step), then the median
    orders = [mine[key]["order"] for mine in gathered]
    replays = []
    for i in range(reps):
        durations = {name: statistics.mean(values) for mine in gathered
                     for name, values in mine[key]["records"][i]["compute"].items()}
        makespan, busy = replay(orders, durations, num_stages)
        replays.append([1 - b / makespan for b in busy])
    return {"schedule": schedule, "m": m, "vocab": int(vocab), "v": v, "reps": reps, "ranks": per_rank,
            "action_medians": medians, "formula": formula(schedule, m, v),
            "replay_idle": [statistics.median(r[rank] for r in replays) for rank in range(PP)]}


def report(args, results: list[dict], load: tuple[float, float]) -> str:
    lines = [f"MegatronGPT (GPT-2 shape) hidden {args.hidden}, {args.heads} heads, {args.layers} layers, seq "
             f"{args.seq}, micro-batch {args.micro_batch}, dropout 0.1; PP={PP} on {machine(args)}; torch "
             f"{torch.__version__}; medians of {args.reps} repetitions; load average (1 min) before {load[0]:.2f}, "
             f"after {load[1]:.2f}, on {os.cpu_count()} cores", "",
             "Idle fraction of each rank = 1 - compute / wall time: over the whole train_step (with the tied-gradient "
             "all-reduce and the loss broadcast) and over the schedule alone; formula: (p-1)/(m+p-1), interleaved "
             "(p-1)/(v*m+p-1); replay: the schedule's actions with the measured compute times and free communication; "
             "cpu/wall: the CPU time of the compute calls over their wall time (below 1: the OS ran other work).",
             f"{'schedule':17} {'vocab':>6} {'v':>2} {'m':>2} {'formula':>8} {'replay r0/r1':>13} "
             f"{'schedule r0/r1':>15} {'step r0/r1':>13} {'step s':>7} {'tied ms':>8} {'cpu/wall':>9}  "
             "per micro-batch ms (stage+kind)"]
    for r in results:
        rank0, rank1 = r["ranks"]
        f = f"{r['formula']:.3f}" if r["formula"] is not None else "-"
        actions = " ".join(f"{name}={value * 1e3:.0f}" for name, value in sorted(r["action_medians"].items()))
        lines.append(
            f"{r['schedule']:17} {r['vocab']:>6} {r['v']:>2} {r['m']:>2} {f:>8} "
            f"{r['replay_idle'][0]:>6.3f}/{r['replay_idle'][1]:.3f} "
            f"{rank0['idle_schedule']:>8.3f}/{rank1['idle_schedule']:.3f} "
            f"{rank0['idle_step']:>6.3f}/{rank1['idle_step']:.3f} {max(rank0['wall'], rank1['wall']):>7.3f} "
            f"{max(rank0['tied'], rank1['tied']) * 1e3:>8.1f} "
            f"{rank0['compute_cpu_share']:>4.2f}/{rank1['compute_cpu_share']:.2f}  {actions}")
    return "\n".join(lines)


def machine(args) -> str:
    if args.device == "cuda":
        return f"2 x {torch.cuda.get_device_name(0)} (NCCL, bf16 autocast, compute timed between synchronisations)"
    return f"2 gloo processes, fp32, {args.threads} torch thread(s) each"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2, help="samples per micro-batch")
    parser.add_argument("--micro-batches", default="2,4,8", help="values of m, comma-separated")
    parser.add_argument("--schedules", default="1f1b,interleaved-1f1b,interleaved-zb",
                        help=f"comma-separated, of {', '.join(SCHEDULES)}")
    parser.add_argument("--virtual", type=int, default=2, help="stages per rank of the interleaved schedules")
    parser.add_argument("--vocab", type=int, default=1024, help="small: the two stages do nearly equal work")
    parser.add_argument("--heavy-vocab", type=int, default=0, help="also 1F1B at this vocabulary (0: not)")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo; cuda: NCCL, one GPU per rank (2 GPUs)")
    parser.add_argument("--name", default="pipeline_bubble", help="stem of the output files")
    parser.add_argument("--out", default=str(REPO / "scripts" / "bench" / "results"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < PP:
        parser.error(f"--device cuda runs PP={PP} with one GPU per rank; this machine has "
                     f"{torch.cuda.device_count()} GPU(s)")
    unknown = [s for s in args.schedules.split(",") if s not in SCHEDULES]
    if unknown:
        parser.error(f"--schedules {args.schedules}: {', '.join(unknown)} unknown; choose from {', '.join(SCHEDULES)}")
    try:
        args.micro_batches = [int(m) for m in args.micro_batches.split(",")]
    except ValueError:
        parser.error(f"--micro-batches {args.micro_batches}: give integers separated by commas, e.g. 2,4,8")
    if min(args.micro_batches) < PP:
        parser.error(f"--micro-batches {args.micro_batches}: PP={PP} needs at least {PP} micro-batches")
    chunks = PP * (args.virtual if any(s.startswith("interleaved") for s in args.schedules.split(",")) else 1)
    if args.layers % chunks:
        parser.error(f"--layers {args.layers} does not divide into {chunks} stages; use a multiple of {chunks}")
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: give at least 1")
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = os.getloadavg()[0]
    partial = out_dir / ".pipeline-bubble.partial.json"
    mp.spawn(_worker, args=(free_port(), args, str(partial)), nprocs=PP, join=True)
    gathered = json.loads(partial.read_text())
    results = [analyse(gathered, key) for key in gathered[0]]
    partial.unlink()
    load = (before, os.getloadavg()[0])
    text = report(args, results, load)
    print(text)
    from megahf.atomic import atomic_write_json, atomic_write_text

    settings = {key: value for key, value in vars(args).items() if key != "out"}  # not the machine's path
    atomic_write_json(out_dir / f"{args.name}.json", {"args": settings, "load_average": load, "results": results})
    atomic_write_text(out_dir / f"{args.name}.txt", text + "\n")


if __name__ == "__main__":
    main()
