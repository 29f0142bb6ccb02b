"""The options of `megahf preprocess`, apart from the implementation so that `megahf --help` and argument errors
need neither transformers nor datasets (nor datatrove): `add_arguments`, and `ExecutorOptions` for the datatrove
executors, checked against each other before anything is read."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Optional

from .preprocess_errors import PreprocessError

DTYPE_CHOICES = ("auto", "uint8", "int16", "uint16", "int32", "int64")
EXECUTORS = ("local", "slurm", "ray")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `megahf preprocess`'s options to `parser`."""
    parser.description = parser.description or "Tokenize a corpus into Megatron .bin/.idx files."
    g = parser.add_argument_group("input")
    g.add_argument("--input", required=True, help="a .jsonl/.json/.parquet/.txt file, a folder, or a cached Hugging Face dataset name")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY", help="keys (columns) holding the text (default: text)")
    g.add_argument("--split", default="train", help="split of a Hugging Face dataset or folder (default: train)")
    g.add_argument("--subset", default=None, help="configuration (subset) name of a Hugging Face dataset")
    g = parser.add_argument_group("tokenization")
    g.add_argument(
        "--tokenizer", required=True,
        help="'gpt2' (or 'embedded') or 'bert-uncased' for a tokenizer shipped with megahf, else a path or cached "
             "name for AutoTokenizer",
    )
    g.add_argument("--append-eod", action="store_true", help="append the eos token id to the end of each document")
    g.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (rule-based splitter, no nltk)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="token dtype (auto: uint16 if vocab < 65500, else int32)")
    g = parser.add_argument_group("output and runtime")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default 1: in-process); with --executor: tasks running at once "
                        "(default: all)")
    g.add_argument("--log-interval", type=int, default=10000, help="print progress every N documents (0: never; default 10000)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group(
        "datatrove executors (pip install 'megahf[distributed]')",
        "Run on datatrove: --tasks contiguous parts of the input, each tokenized into its own pair, then merged in "
        "input order: the same bytes as without --executor. The same command run again does only what is missing.")
    g.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="datatrove executor (default: none, this machine's own worker pool)")
    g.add_argument("--tasks", type=int, default=None, help="parts of the input, one datatrove task each (default 1)")
    g.add_argument("--logging-dir", default=None,
                   help="datatrove's logs, stats and completions, and the parts (default: {output-prefix}.datatrove); "
                        "on a shared filesystem for several machines")
    g.add_argument("--local-tasks", type=int, default=None,
                   help="local: run only this many of the tasks on this machine (several machines, one filesystem)")
    g.add_argument("--local-rank-offset", type=int, default=None, help="local: the first task this machine runs")
    g.add_argument("--partition", default=None, help="slurm: partition (required)")
    g.add_argument("--time", default=None, help="slurm: time limit per task, e.g. 04:00:00 (required)")
    g.add_argument("--qos", default=None, help="slurm: quality of service")
    g.add_argument("--job-name", default=None, help="slurm: job name (default megahf_preprocess)")
    g.add_argument("--env-command", default=None,
                   help="slurm: command that activates megahf's environment in the job (default: the submitting "
                        "shell's environment is exported)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="slurm, ray: CPUs per task (default 1)")
    g.add_argument("--mem-per-cpu-gb", type=float, default=None, help="slurm, ray: memory per CPU in GB (default 2)")
    g.add_argument("--ray-address", default=None,
                   help="ray: the cluster to join (default: ray.init()'s choice, RAY_ADDRESS or a local instance)")
    return parser


@dataclass
class ExecutorOptions:
    """How datatrove runs the job; see `megahf preprocess --help` (group "datatrove executors"). None: not given
    (the executor's default)."""

    executor: str = "local"
    tasks: int = 1
    workers: Optional[int] = None  # tasks at once (None: datatrove's default, all of them)
    local_tasks: Optional[int] = None
    local_rank_offset: int = 0
    logging_dir: Optional[str] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    cpus_per_task: Optional[int] = None  # None: 1 (Slurm and Ray only)
    mem_per_cpu_gb: Optional[float] = None  # None: 2 (Slurm and Ray only)
    qos: Optional[str] = None
    job_name: Optional[str] = None  # None: megahf_preprocess
    env_command: Optional[str] = None
    ray_address: Optional[str] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Optional["ExecutorOptions"]:
        """The options of `megahf preprocess`'s parsed arguments; None without --executor (then none may be given)."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        if args.executor is None:
            given.pop("workers", None)
            if given:
                flags = ", ".join("--" + name.replace("_", "-") for name in given)
                raise PreprocessError(f"{flags}: datatrove options; add --executor local|slurm|ray, or drop them")
            return None
        options = cls(**given)
        options.check()
        return options

    def check(self) -> None:
        """Every option against the executor, before anything is read or written."""
        if self.executor not in EXECUTORS:
            raise PreprocessError(f"--executor {self.executor!r}: use one of {', '.join(EXECUTORS)}")
        if self.tasks < 1:
            raise PreprocessError(f"--tasks {self.tasks}: need at least 1")
        if self.workers is not None and self.workers < 1:
            raise PreprocessError(f"--workers {self.workers}: need at least 1 (tasks running at once)")
        if self.local_tasks is not None or self.local_rank_offset:
            if self.executor != "local":
                raise PreprocessError(
                    f"--local-tasks/--local-rank-offset split the tasks of --executor local over machines; "
                    f"--executor {self.executor} places the tasks itself: drop them")
            local = self.tasks if self.local_tasks is None else self.local_tasks
            if local < 1 or self.local_rank_offset < 0 or self.local_rank_offset + local > self.tasks:
                raise PreprocessError(
                    f"--local-tasks {local} --local-rank-offset {self.local_rank_offset}: this machine's tasks "
                    f"{self.local_rank_offset}..{self.local_rank_offset + local - 1} must lie within the "
                    f"--tasks {self.tasks} tasks 0..{self.tasks - 1}")
        if self.executor != "slurm" and any(
                v is not None for v in (self.partition, self.time, self.qos, self.env_command, self.job_name)):
            raise PreprocessError(f"--partition/--time/--qos/--env-command/--job-name are Slurm options; --executor "
                                  f"{self.executor} does not take them")
        if self.ray_address is not None and self.executor != "ray":
            raise PreprocessError(f"--ray-address is a Ray option; --executor {self.executor} does not take it")
        if self.executor == "local" and (self.cpus_per_task is not None or self.mem_per_cpu_gb is not None):
            raise PreprocessError("--cpus-per-task/--mem-per-cpu-gb reserve resources on Slurm or Ray; --executor "
                                  "local runs --workers tasks at once on this machine: drop them")
        cpus, mem = self.resources
        if cpus < 1 or mem <= 0:
            raise PreprocessError(f"--cpus-per-task {cpus} --mem-per-cpu-gb {mem}: need at least 1 CPU and some "
                                  "memory per task")
        if self.executor == "slurm":
            if mem != int(mem):
                raise PreprocessError(f"--mem-per-cpu-gb {mem}: Slurm takes whole GB, e.g. 2")
            for option, value, example in (("--partition", self.partition, "--partition cpu"),
                                           ("--time", self.time, "--time 04:00:00")):
                if not value:
                    raise PreprocessError(f"--executor slurm needs {option} (e.g. {example})")

    @property
    def resources(self) -> tuple:
        """(CPUs per task, GB per CPU) that Slurm or Ray reserves: the options, else 1 and 2."""
        return (1 if self.cpus_per_task is None else self.cpus_per_task,
                2 if self.mem_per_cpu_gb is None else self.mem_per_cpu_gb)


__all__ = ["DTYPE_CHOICES", "EXECUTORS", "ExecutorOptions", "add_arguments"]
