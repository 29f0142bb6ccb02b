"""What the per-file checksums of a checkpoint cost against writing it: XXH3-128 (megahf's), zlib's CRC-32 and the
digests hashlib offers (sha256, blake2b, sha1, md5), computed as megahf computes them (from the bytes while DCP writes them, torch.save's
own per-record CRC-32 switched off: `megahf.training.checksums`), and sha256 computed by reading the files back
afterwards (what megahf did before). The reference is DCP's plain save (torch.save's record CRC on, its default).

    python scripts/bench/checkpoint_checksum.py [--params 30e6] [--repeats 3]

A model of `--params` fp32 parameters in 2048 x 2048 Linear layers with AdamW state (one step taken: both moments
exist) is written `--repeats` times per variant with torch.distributed.checkpoint, each file fsynced as
`save_checkpoint` does, variants taking turns so that a drift of the machine's load hits all alike. The cost of a
variant is its median save time minus the median of the save with no checksum at all ("no-record-crc"), and, second,
minus DCP's plain save ("none": torch.save's record CRC on, as DCP writes by default). Also printed: each digest's
single-core speed on the checkpoint's bytes, the work the helper thread overlaps with the write.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.utils.serialization import config as torch_serialization_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from megahf.training.checksums import HashingFileSystem, file_digest, new_digest  # noqa: E402

INLINE = ("xxh3_128", "crc32", "sha256", "blake2b", "sha1", "md5")


def save(model, optimizer, path: Path, variant: str) -> float:
    start = time.perf_counter()
    writer = FileSystemWriter(path)
    if variant.startswith("inline-"):
        writer.fs = HashingFileSystem(variant.removeprefix("inline-"))
    before = torch_serialization_config.save.compute_crc32
    if variant == "no-record-crc":  # what the save costs with no checksum at all
        torch_serialization_config.save.compute_crc32 = False
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
    torch_serialization_config.save.compute_crc32 = before
    if variant == "reread-sha256":
        for file in path.rglob("*"):
            file_digest(file, "sha256")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=30e6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    width = 2048
    layers = max(1, round(args.params / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, width)).sum().backward()
    optimizer.step()
    variants = ["none", "no-record-crc", *(f"inline-{name}" for name in INLINE), "reread-sha256"]
    times = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(dir=".") as root:
        for repeat in range(args.repeats):
            for variant in variants:
                path = Path(root) / f"{variant}-{repeat}"
                times[variant].append(save(model, optimizer, path, variant))
                size = sum(p.stat().st_size for p in path.rglob("*"))
                for p in path.rglob("*"):
                    p.unlink()
    plain, bare = statistics.median(times["none"]), statistics.median(times["no-record-crc"])
    print(f"checkpoint: {layers * width * width / 1e6:.1f}M fp32 parameters + AdamW moments = {size / 1e9:.2f} GB; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    print(f"save with no checksum at all: {bare:.3f} s; DCP's save as torch writes it (torch.save's record CRC-32 "
          f"on): {plain:.3f} s (medians of {args.repeats})")
    sample = os.urandom(64 << 20)
    for variant in variants[2:]:
        t = statistics.median(times[variant])
        speed = ""
        if variant.startswith("inline-"):
            digest, start = new_digest(variant.removeprefix("inline-")), time.perf_counter()
            digest.update(sample)
            speed = f"  digest {len(sample) / (time.perf_counter() - start) / 1e9:5.2f} GB/s on one core"
        print(f"  {variant:15s} {t:.3f} s  cost {t - bare:+.3f} s = {(t - bare) / bare:+6.1%} of the bare save, "
              f"{(t - plain) / plain:+6.1%} of DCP's{speed}")

if __name__ == "__main__":
    main()
