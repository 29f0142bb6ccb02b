"""Print, as one JSON line from rank 0, the peak that a launch of this many processes measures for MFU.

With `--fake`, each rank's matmul rate is replaced by rank + 1 TFLOP/s and every call of `sync` is counted, so that
how the ranks' figures combine is checked exactly, apart from any timing."""

import json
import sys

import torch.distributed as dist

from megahf.parallel.ranks import is_rank_zero, rank
from megahf.training import flops

if __name__ == "__main__":
    dist.init_process_group("gloo")
    syncs = []
    if "--fake" in sys.argv:
        def fake_rate(threads=None, sync=None, **_):
            for _ in range(3):
                sync()
                syncs.append(threads)
            return float(rank() + 1)

        flops.measure_cpu_matmul_tflops = fake_rate
    tflops, source, devices = flops.launch_peak_tflops()
    if is_rank_zero():
        print("PEAK " + json.dumps({"tflops": tflops * devices, "source": source, "devices": devices,
                                    "syncs": len(syncs), "threads": syncs[:1]}), flush=True)
    dist.destroy_process_group()
