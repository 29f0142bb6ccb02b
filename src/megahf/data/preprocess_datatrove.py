"""`megahf preprocess --executor local|slurm|ray`: the same output bytes as the single-machine path, produced by
datatrove's executors running megahf's reader, tokenizer and writer (`datatrove_steps`): one task per contiguous
part of the input, then a dependent one-task merge stage.

The run's folder (`--logging-dir`, default `{output_prefix}.datatrove/`) holds `job.json` (what the run is),
`tokenize/` and `merge/` (datatrove's logging folders: `logs/`, `stats/`, `completions/`, `executor.json`),
`parts/` (the tasks' pairs, removed after the merge) and `merged.json` (the counts of the finished output). The same
command run again does only what is missing: datatrove skips the tasks whose completion it recorded. A folder that
holds another job (another input, tokenizer, setting or task count) is refused before anything runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from typing import Any, Dict, Optional, Sequence

from ..assets import embedded_tokenizer_path
from ..atomic import atomic_write_json
from .corpus_reader import input_state, open_corpus
from .document_tokenizer import load_tokenizer, tokenize_settings
from .preprocess_arguments import ExecutorOptions
from .preprocess_errors import PreprocessError, check_arguments
from .preprocess_output import PreprocessResult, make_output_folder

INSTALL_HINT = "pip install 'megahf[distributed]'"


def require_datatrove(executor: str) -> None:
    """One line naming the extra to install when datatrove (or Ray for `--executor ray`) is missing."""
    try:
        import datatrove  # noqa: F401
    except ImportError as e:
        raise PreprocessError(f"--executor {executor} runs on datatrove, which is not installed ({e}); "
                              f"install it with: {INSTALL_HINT}") from None
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise PreprocessError(f"--executor ray needs Ray, which is not installed ({e}); install it with: "
                                  "pip install 'datatrove[ray]'") from None


def _claim_work_dir(job_json: Dict[str, Any], path: str) -> None:
    """Write `job.json`, or check that the folder's holds the same job (then its finished tasks are reused)."""
    job_json = json.loads(json.dumps(job_json))  # as read back (tuples become lists)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        changed = [k for k in sorted(set(old) | set(job_json)) if old.get(k) != job_json.get(k)]
        if changed:
            folder = os.path.dirname(path)
            raise PreprocessError(
                f"{path}: {folder} holds a run of another job (it differs in: {', '.join(changed)}); its finished "
                f"tasks cannot be reused: remove {folder} to start over, or give another --logging-dir")
        return
    atomic_write_json(path, job_json, indent=2)


def preprocess_datatrove(
    input: str,
    output_prefix: str,
    options: ExecutorOptions,
    tokenizer: str = "gpt2",
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    split_sentences: bool = False,
    dtype: Optional[str] = "auto",
    split: str = "train",
    subset: Optional[str] = None,
    log_interval: int = 0,
) -> Optional[PreprocessResult]:
    """Run `megahf preprocess` on a datatrove executor; see the module docstring. Returns the result once the final
    pairs are written, None when the job is not finished here (a Slurm submission, or `--local-tasks` while other
    machines' tasks are still missing; a message says what happens next)."""
    t0 = time.perf_counter()
    keys = tuple(dict.fromkeys(json_keys))
    check_arguments(keys, 1, output_prefix)
    options.check()
    require_datatrove(options.executor)
    open_corpus(input, keys, split, subset)
    tok = load_tokenizer(tokenizer)
    settings = tokenize_settings(tok, tokenizer, append_eod, split_sentences, dtype)

    from .datatrove_steps import PreprocessJob, plan_tokenizer

    work_dir = os.path.abspath(options.logging_dir or output_prefix + ".datatrove")
    # paths as absolute paths: a Slurm or Ray task need not start in this folder
    if os.path.exists(input):
        input = os.path.abspath(input)
    if embedded_tokenizer_path(tokenizer) is None and os.path.exists(tokenizer):
        tokenizer = os.path.abspath(tokenizer)
    job = PreprocessJob(input=input, split=split, subset=subset, keys=keys, tokenizer=tokenizer, settings=settings,
                        output_prefix=os.path.abspath(output_prefix), work_dir=work_dir, tasks=options.tasks,
                        input_state=input_state(input), log_interval=log_interval, threads=_threads(options))
    make_output_folder(output_prefix)
    os.makedirs(work_dir, exist_ok=True)
    identity = {k: v for k, v in job.as_dict().items() if k not in ("work_dir", "log_interval", "threads")}
    _claim_work_dir(identity, os.path.join(work_dir, "job.json"))
    if os.path.isfile(job.merged_path) and not job.finished():
        raise PreprocessError(
            f"{job.merged_path} records a finished merge but {' or '.join(p + '.bin/.idx' for p in job.prefixes.values())}"
            f" is missing (removed since?); remove {work_dir} to run the job again")

    tokenize, merge = _executors(job, options)
    plan_tokenizer(job.tokenizer, tok)  # for the tasks forked from this process, and the merge run in it
    try:
        return _run(job, options, tokenize, merge, t0)
    finally:
        plan_tokenizer(None)


def _run(job, options: ExecutorOptions, tokenize, merge, t0: float) -> Optional[PreprocessResult]:
    """Run (or submit) the two stages; the result once the final pairs are written (see `preprocess_datatrove`)."""
    work_dir = job.work_dir
    if options.executor == "slurm":
        merge.run()  # submits the tokenize array (if any task is missing), then the merge job depending on it
        print(f"megahf preprocess: submitted to Slurm (tokenize job {tokenize.job_id}, merge job {merge.job_id}); "
              f"logs, stats and completions in {work_dir}; the output appears when the merge job ends")
        return None
    if options.executor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=options.ray_address)
    tokenize.run()
    missing = tokenize.get_incomplete_ranks()
    if missing:
        print(f"megahf preprocess: {options.tasks - len(missing)} of {options.tasks} tasks are done "
              f"(missing: {_ranks(missing)}); the merge runs once all are: run the same command (on the machine of "
              f"the missing tasks, or without --local-tasks) when they are done")
        return None
    merge.run()
    if not job.finished():
        raise PreprocessError(f"the merge stage did not finish; its logs are in {os.path.join(work_dir, 'merge')}")
    with open(job.merged_path, encoding="utf-8") as f:
        merged = json.load(f)
    merged.pop("merge_seconds", None)
    result = PreprocessResult(**merged)
    result.seconds = time.perf_counter() - t0
    result.workers = options.tasks
    result.executor = f"datatrove {options.executor} executor"
    return result


def _threads(options: ExecutorOptions) -> Optional[int]:
    """The Rust tokenizer's threads in each task: a Slurm/Ray task's CPUs; for local tasks running at once, this
    machine's cores divided among them (one each when they are as many as the cores: their thread pools would
    oversubscribe them); None for one task at a time (its thread pool takes every core)."""
    if options.executor != "local":
        return options.resources[0]
    at_once = options.tasks if options.local_tasks is None else options.local_tasks
    if options.workers is not None:
        at_once = min(at_once, options.workers)
    return None if at_once <= 1 else max(1, (os.cpu_count() or 1) // at_once)


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(map(str, ranks[:10])) + (f" and {len(ranks) - 10} more" if len(ranks) > 10 else "")


def _executors(job, options: ExecutorOptions):
    """The tokenize executor (`options.tasks` tasks) and the merge executor (one task, depending on it)."""
    from .datatrove_steps import MergeShards, TokenizeShard

    logs = {stage: os.path.join(job.work_dir, stage) for stage in ("tokenize", "merge")}
    workers = -1 if options.workers is None else options.workers
    if options.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        # fork, not datatrove's default forkserver: this process has imported the tokenizer stack (transformers,
        # torch) and tokenized nothing yet, so forked tasks start at once instead of importing it again each (seconds)
        start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "forkserver"
        tokenize = LocalPipelineExecutor(
            [TokenizeShard(job)], tasks=options.tasks, workers=workers, logging_dir=logs["tokenize"],
            local_tasks=-1 if options.local_tasks is None else options.local_tasks,
            local_rank_offset=options.local_rank_offset, start_method=start_method)
        merge = LocalPipelineExecutor([MergeShards(job)], tasks=1, workers=1, logging_dir=logs["merge"],
                                      depends=tokenize)
        return tokenize, merge
    cpus, mem = options.resources
    if options.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        name = options.job_name or "megahf_preprocess"
        common = dict(time=options.time, partition=options.partition, qos=options.qos or "",
                      env_command=options.env_command, mem_per_cpu_gb=int(mem))
        tokenize = SlurmPipelineExecutor([TokenizeShard(job)], tasks=options.tasks, workers=workers,
                                         cpus_per_task=cpus, job_name=name, logging_dir=logs["tokenize"], **common)
        merge = SlurmPipelineExecutor([MergeShards(job)], tasks=1, cpus_per_task=1, job_name=name + "_merge",
                                      logging_dir=logs["merge"], depends=tokenize, **common)
        return tokenize, merge
    from datatrove.executor.ray import RayPipelineExecutor

    tokenize = RayPipelineExecutor([TokenizeShard(job)], tasks=options.tasks, workers=workers,
                                   logging_dir=logs["tokenize"], cpus_per_task=cpus, mem_per_cpu_gb=mem)
    merge = RayPipelineExecutor([MergeShards(job)], tasks=1, workers=1, logging_dir=logs["merge"], depends=tokenize,
                                cpus_per_task=1, mem_per_cpu_gb=mem)
    return tokenize, merge

__all__ = ["INSTALL_HINT", "preprocess_datatrove", "require_datatrove"]
