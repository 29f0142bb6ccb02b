"""Print, as one JSON line from rank 0, the peak that a launch of this many processes measures for MFU."""

import json

import torch.distributed as dist

from megahf.parallel.ranks import is_rank_zero
from megahf.training.flops import launch_peak_tflops

if __name__ == "__main__":
    dist.init_process_group("gloo")
    tflops, source, devices = launch_peak_tflops()
    if is_rank_zero():
        print("PEAK " + json.dumps({"tflops": tflops * devices, "source": source, "devices": devices}), flush=True)
    dist.destroy_process_group()
