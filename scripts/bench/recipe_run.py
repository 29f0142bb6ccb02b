#!/usr/bin/env python
"""Run a recipe as a user does (`megahf pretrain RECIPE [--key value ...]`, one process) and keep what it printed and
the `metrics.json` it wrote, for the README's example runs (the demo, BERT's tiny recipe).

    python scripts/bench/recipe_run.py --name demo-gpt-tiny-cpu recipes/gpt/tiny.yaml
    python scripts/bench/recipe_run.py --name bert-tiny-cpu recipes/bert/tiny.yaml

Writes `scripts/bench/results/NAME.txt` (the command, the load average before and after, wall seconds, and the run's
console output, progress bars aside) and `NAME.json` (the run's metrics.json, plus the same context). Loss,
perplexity and accuracy depend on the seed and the CPU's rounding only; tokens/s, MFU and seconds depend on what else
the machine ran: the load average says how quiet it was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="results/NAME.txt and NAME.json")
    parser.add_argument("recipe")
    args, extra = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "megahf", "pretrain", args.recipe, *extra, "--output_dir", tmp]
        shown = " ".join(["megahf", "pretrain", args.recipe, *extra])
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds = time.perf_counter() - start
        load_after = os.getloadavg()[0]
        output = done.stdout + done.stderr
        if done.returncode != 0:
            print(output[-4000:], file=sys.stderr)
            return done.returncode
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line
             and "s/it]" not in line]
    context = {"command": shown, "wall_seconds_with_start_up": round(seconds, 1), "cpus": os.cpu_count(),
               "load_average_before": round(load_before, 2), "load_average_after": round(load_after, 2)}
    header = [f"$ {shown}", f"{os.cpu_count()} CPUs; 1-minute load average {load_before:.2f} before, "
              f"{load_after:.2f} after; {seconds:.0f} s wall including start-up"
              + ("  (other jobs shared the machine: speed figures are disturbed)" if load_before >= 1 else "")]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.txt").write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({**context, "metrics": metrics}, indent=1) + "\n",
                                               encoding="utf-8")
    print("\n".join(header))
    print(json.dumps(metrics, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
