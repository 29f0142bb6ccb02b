"""Checkpoint conversion benchmark: a Megatron-LM legacy checkpoint (random weights, gpt-1.2b shape, TP=2) to a megahf
model folder, against the checkpoint's size and the disk's sequential read speed measured in the same run.

    python scripts/bench/convert.py                         # gpt-1.2b, TP=2, bf16, in a temporary folder
    python scripts/bench/convert.py --num-layers 8          # the same width, fewer layers (a busy machine)
    python scripts/bench/convert.py --proof                 # also time the proof (probe logits + round trip)

Steps: (1) write the checkpoint with megahf's Megatron writer, one pipeline stage in memory; (2) evict its files from
the page cache (posix_fadvise DONTNEED) and read them sequentially in 16 MiB blocks: the disk's read speed, cold;
then write as many bytes (the conversion writes about as much as it reads); (3) evict again and convert in a fresh
process (`megahf.convert.convert(..., proof=False)`), timed, its memory sampled every 20 ms: peak anonymous memory
(what the process owns: the tensors it builds), also less the baseline of the imported libraries (torch,
transformers), and peak resident memory (also the memory-mapped checkpoint pages it touched, which the kernel can
drop at will). Goals (issue #10): peak memory under 1.5 x the largest shard (judged on the growth over the
baseline), throughput (checkpoint bytes / seconds) at least half the disk's read speed.
Prints a table and one `JSON {...}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 16 << 20
CHILD = r"""
import json, sys, threading, time
def anon_and_rss():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("RssAnon", 0), fields.get("VmRSS", 0)
peak = [0, 0]
done = False
def sample():
    while not done:
        anon, rss = anon_and_rss()
        peak[0], peak[1] = max(peak[0], anon), max(peak[1], rss)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from megahf.convert import convert
baseline = anon_and_rss()
start = time.perf_counter()
report = convert(sys.argv[1], sys.argv[2], "megatron", "megahf", proof=sys.argv[3] == "1", show_progress=False)
seconds = time.perf_counter() - start
done = True
anon, rss = anon_and_rss()
peak[0], peak[1] = max(peak[0], anon), max(peak[1], rss)
print("RESULT " + json.dumps({"seconds": seconds, "peak_anon": peak[0], "peak_rss": peak[1],
                              "baseline_anon": baseline[0], "report_seconds": report["seconds"],
                              "ok": report["ok"]}))
"""


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache, so that the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_speed(paths: list[Path]) -> float:
    """Bytes per second of a cold sequential read of `paths`."""
    evict(paths)
    total, start = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(BLOCK):
                total += len(chunk)
    return total / (time.perf_counter() - start)


def write_speed(folder: Path, total: int) -> float:
    """Bytes per second of a sequential write of `total` bytes into `folder` (random bytes, reaching the page cache;
    not fsynced, as the conversion does not fsync either), the file removed afterwards."""
    block = os.urandom(BLOCK)
    path = folder / "write-speed.tmp"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        written = 0
        while written < total:
            written += f.write(block[: min(BLOCK, total - written)])
    seconds = time.perf_counter() - start
    path.unlink()
    return total / seconds


def make_checkpoint(folder: Path, preset: str, tp: int, dtype: str, num_layers: int | None) -> None:
    import torch

    from megahf import MegatronGPTConfig
    from megahf.convert.common import LoadedCheckpoint, TensorRef
    from megahf.convert.megatron_legacy import write_megatron

    overrides = {"num_layers": num_layers} if num_layers else {}
    config = MegatronGPTConfig.from_preset(preset, **overrides)
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        from megahf import MegatronGPTForCausalLM
        shapes = {k: tuple(v.shape) for k, v in MegatronGPTForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("output_layer.weight", None)
    generator = torch.Generator().manual_seed(0)

    def random(shape):
        return lambda: (torch.randn(shape, generator=generator) * 0.02).to(torch_dtype)

    tensors = {name: TensorRef(shape, torch_dtype, random(shape)) for name, shape in shapes.items()}
    write_megatron(LoadedCheckpoint(config, "MegatronGPTForCausalLM", tensors), folder, tp=tp, show_progress=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt-1.2b")
    parser.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--proof", action="store_true", help="also run (and time) the conversion's proof")
    parser.add_argument("--workdir", default=None, help="folder for the checkpoints (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the JSON result here")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="megahf-convert-bench-"))
    source, target = work / "megatron", work / "megahf"
    shutil.rmtree(source, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    make_checkpoint(source, args.preset, args.tp, args.dtype, args.num_layers)
    write_seconds = time.perf_counter() - start
    shards = sorted(source.rglob("model_optim_rng.pt"))
    sizes = [p.stat().st_size for p in shards]
    disk = read_speed(shards)
    disk_write = write_speed(work, sum(sizes))
    evict(shards)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src") + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(source), str(target), "1" if args.proof else "0"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    child = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    load_after = os.getloadavg()[0]
    total, largest = sum(sizes), max(sizes)
    convert_seconds = child["report_seconds"]["convert"]
    throughput = total / convert_seconds
    result = {
        "preset": args.preset, "num_layers": args.num_layers, "tp": args.tp, "dtype": args.dtype,
        "checkpoint_bytes": total, "largest_shard_bytes": largest, "shards": len(shards),
        "write_checkpoint_seconds": round(write_seconds, 2),
        "disk_read_bytes_per_s": disk, "disk_write_bytes_per_s": disk_write, "convert_seconds": convert_seconds,
        "proof_seconds": child["report_seconds"]["proof"] if args.proof else None,
        "process_seconds": round(child["seconds"], 3),
        "throughput_bytes_per_s": throughput, "throughput_over_disk": throughput / disk,
        "throughput_over_disk_write": throughput / disk_write,
        "peak_anon_bytes": child["peak_anon"], "peak_rss_bytes": child["peak_rss"],
        "baseline_anon_bytes": child["baseline_anon"],
        "peak_anon_over_largest_shard": child["peak_anon"] / largest,
        "converting_anon_over_largest_shard": (child["peak_anon"] - child["baseline_anon"]) / largest,
        "peak_rss_over_largest_shard": child["peak_rss"] / largest,
        "goal_memory_met": child["peak_anon"] - child["baseline_anon"] < 1.5 * largest,
        "goal_throughput_met": throughput >= 0.5 * disk,
        "proof_ok": child["ok"] if args.proof else None,
        "load_average_before": load_before, "load_average_after": load_after, "cpus": os.cpu_count(),
    }
    mib = 2 ** 20
    layers = f" ({args.num_layers} layers)" if args.num_layers else ""
    print(f"checkpoint: {args.preset}{layers}, TP={args.tp}, {args.dtype}: {total / mib:.0f} MiB in {len(shards)} "
          f"shards (largest {largest / mib:.0f} MiB)")
    print(f"disk sequential read (cold): {disk / mib:.0f} MiB/s; sequential write (not fsynced): "
          f"{disk_write / mib:.0f} MiB/s")
    print(f"convert megatron -> megahf: {convert_seconds:.1f} s = {throughput / mib:.0f} MiB/s "
          f"({throughput / disk:.2f} x disk; goal >= 0.5: {'met' if result['goal_throughput_met'] else 'NOT met'})")
    grown, base = child["peak_anon"] - child["baseline_anon"], child["baseline_anon"]
    memory_goal = "met" if result["goal_memory_met"] else "NOT met"
    print(f"peak memory of converting: anonymous +{grown / mib:.0f} MiB over the {base / mib:.0f} MiB of the imported "
          f"libraries = {result['converting_anon_over_largest_shard']:.2f} x largest shard (goal < 1.5: {memory_goal})")
    print(f"whole process: anonymous {child['peak_anon'] / mib:.0f} MiB, resident incl. mapped checkpoint pages "
          f"{child['peak_rss'] / mib:.0f} MiB = {result['peak_rss_over_largest_shard']:.2f} x largest shard")
    if args.proof:
        print(f"proof (probe logits + round trip): {result['proof_seconds']:.1f} s, ok={child['ok']}")
    print(f"load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs"
          + ("  (other processes competed: times are pessimistic)" if max(load_before, load_after) > 1 else ""))
    print("JSON " + json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
