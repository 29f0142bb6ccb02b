"""`megahf preprocess --executor local|slurm|ray`: datatrove's executors running megahf's reader, tokenizer and writer
write the bytes of the single-machine path; a failed task is rerun alone by the same command; two machines
(`--local-tasks`) add up to the same bytes; the Slurm submission is what datatrove would send, and its array tasks,
run as Slurm would run them, give the same bytes; bad options fail in one line before anything is read.

The local executor runs its tasks in this process (`--workers 1`, datatrove's sequential mode) except in the one test
of worker processes; nothing here depends on timing."""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from required import oracle

oracle("datatrove")

from megahf.cli import main as cli_main  # noqa: E402
from megahf.data import datatrove_steps  # noqa: E402
from megahf.data.preprocess import preprocess_corpus  # noqa: E402
from megahf.data.preprocess_arguments import ExecutorOptions  # noqa: E402
from megahf.data.preprocess_datatrove import _executors, _threads, preprocess_datatrove  # noqa: E402
from megahf.data.preprocess_errors import PreprocessError  # noqa: E402

DOCS = (["Hello world. This is megahf.", "", "Mr. Smith went to Washington. He stayed!\n\nA new paragraph? yes.",
         " caf\u00e9 \u2014 \u65e5\u672c\u8a9e!"]
        + [f"Document number {i}. It has {'two sentences' if i % 3 else 'one'}." for i in range(36)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl with blank lines between some records, so that byte ranges start on, inside and before blank lines."""
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(DOCS):
            f.write(json.dumps({"text": text, "id": i}) + "\n" + ("\n" if i % 7 == 0 else ""))
    return str(path)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The single-machine path's output prefix, per sentence splitting (made when first asked for)."""
    out = tmp_path_factory.mktemp("single")

    class Outputs(dict):
        def __missing__(self, split):
            self[split] = preprocess_corpus(corpus, str(out / f"s{split}"), append_eod=True, split_sentences=split,
                                            progress=False).prefixes["text"]
            return self[split]

    return Outputs()


def same_bytes(a: str, b: str) -> bool:
    return all(Path(a + suffix).read_bytes() == Path(b + suffix).read_bytes() for suffix in (".bin", ".idx"))


def no_second_load(name):
    raise AssertionError(f"a task loaded the tokenizer {name!r} again instead of taking the planning process's")


def run_local(corpus, prefix, tasks=3, split_sentences=False, **options):
    options.setdefault("workers", 1)
    return preprocess_datatrove(corpus, str(prefix), ExecutorOptions(executor="local", tasks=tasks, **options),
                                append_eod=True, split_sentences=split_sentences)


@pytest.mark.parametrize("split_sentences", [False, pytest.param(True, marks=pytest.mark.extended)],
                         ids=["documents", "sentences"])
def test_local_executor_writes_the_single_machine_bytes(tmp_path, corpus, reference, split_sentences, monkeypatch):
    # the tasks and the merge run in this process: they take the tokenizer loaded to plan the job
    monkeypatch.setattr(datatrove_steps, "load_tokenizer", no_second_load)
    result = run_local(corpus, tmp_path / "dt", split_sentences=split_sentences)
    assert datatrove_steps._PLANNED_TOKENIZER == {}  # forgotten once the job is done
    assert same_bytes(result.prefixes["text"], reference[split_sentences])
    assert result.records == len(DOCS) and result.skipped_empty["text"] == 1
    work = tmp_path / "dt.datatrove"
    assert sorted(os.listdir(work / "tokenize" / "completions")) == ["00000", "00001", "00002"]
    assert os.listdir(work / "merge" / "completions") == ["00000"]
    assert not (work / "parts").exists()  # the parts are temporary
    stats = json.loads((work / "tokenize" / "stats.json").read_text())
    assert stats[0]["stats"]["documents"]["total"] == len(DOCS) - 1


@pytest.mark.extended
def test_a_datasets_folder_is_split_into_record_ranges(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.table({"text": DOCS}), folder / "train-00000-of-00001.parquet")
    single = preprocess_corpus(str(folder), str(tmp_path / "single"), append_eod=True, progress=False)
    result = run_local(str(folder), tmp_path / "dt", tasks=3)
    assert same_bytes(result.prefixes["text"], single.prefixes["text"])


@pytest.mark.extended
def test_four_tasks_on_two_worker_processes(tmp_path, corpus, reference, monkeypatch):
    """datatrove's process pool: the steps travel pickled to processes forked from this one, which take the tokenizer
    loaded to plan the job instead of loading it again."""
    monkeypatch.setattr(datatrove_steps, "load_tokenizer", no_second_load)
    result = run_local(corpus, tmp_path / "dt", tasks=4, workers=2)
    assert same_bytes(result.prefixes["text"], reference[False])


def test_a_failed_task_reruns_alone_and_the_bytes_match(tmp_path, corpus, reference, monkeypatch):
    ran, calls = [], []
    real_run, real_encode = datatrove_steps.TokenizeShard.run, datatrove_steps.encode_chunk

    def spy_run(self, data=None, rank=0, world_size=1):
        ran.append(rank)
        return real_run(self, data, rank, world_size)

    def dies_in_task_1(chunk, tok, job):  # task 1 dies after opening its output, as a killed process would
        calls.append(job.description)
        if len(calls) == 2:
            raise RuntimeError("task killed")
        return real_encode(chunk, tok, job)

    monkeypatch.setattr(datatrove_steps.TokenizeShard, "run", spy_run)
    monkeypatch.setattr(datatrove_steps, "encode_chunk", dies_in_task_1)
    with pytest.raises(RuntimeError, match="task killed"):
        run_local(corpus, tmp_path / "dt", tasks=2)
    work = tmp_path / "dt.datatrove"
    assert ran == [0, 1] and os.listdir(work / "tokenize" / "completions") == ["00000"]
    assert not os.path.exists(str(tmp_path / "dt_text_document.bin"))
    (work / "parts" / ".text_00001.bin.tmp-99999").write_bytes(b"left by a killed process")

    ran.clear()
    result = run_local(corpus, tmp_path / "dt", tasks=2)
    assert ran == [1]  # task 0 is not run again
    assert same_bytes(result.prefixes["text"], reference[False])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary file left beside the output
    # once more: everything is recorded as done, nothing runs, the same counts come back
    again = run_local(corpus, tmp_path / "dt", tasks=2)
    assert ran == [1] and again.tokens == result.tokens and again.records == len(DOCS)


def test_two_machines_then_the_merge(tmp_path, corpus, reference, capsys):
    first = run_local(corpus, tmp_path / "dt", tasks=2, local_tasks=1, local_rank_offset=0)
    assert first is None and "1 of 2 tasks are done (missing: 1)" in capsys.readouterr().out
    assert not os.path.exists(str(tmp_path / "dt_text_document.bin"))
    # the folder now holds this job: another one (here: other task count, hence other parts) is refused
    with pytest.raises(PreprocessError, match=r"holds a run of another job \(it differs in: tasks\).*remove"):
        run_local(corpus, tmp_path / "dt", tasks=3)
    second = run_local(corpus, tmp_path / "dt", tasks=2, local_tasks=1, local_rank_offset=1)
    assert same_bytes(second.prefixes["text"], reference[False])
    os.remove(second.prefixes["text"] + ".idx")  # the folder says "done": a missing output is not silently skipped
    with pytest.raises(PreprocessError, match=r"records a finished merge but .* is missing \(removed since\?\)"):
        run_local(corpus, tmp_path / "dt", tasks=2)


# ------------------------------------------------------------------------------------------------------------ Slurm
FAKE_SBATCH = """#!/bin/sh
# records what would be submitted and answers like sbatch
n=$(ls "$SUBMITTED" | grep -c '^script_' || true)
for last; do :; done
cp "$last" "$SUBMITTED/script_$n"
echo "$@" > "$SUBMITTED/args_$n"
echo "Submitted batch job $((n + 100))"
"""


def test_slurm_submission_then_its_array_tasks_give_the_same_bytes(tmp_path, corpus, reference, monkeypatch):
    from datatrove.tools import launch_pickled_pipeline

    corpus = str(shutil.copy2(corpus, tmp_path / "c.jsonl"))  # its modification time is changed below

    bin_dir, submitted = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir(), submitted.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scontrol", "#!/bin/sh\necho node1\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SUBMITTED", str(submitted))
    options = ExecutorOptions(executor="slurm", tasks=3, partition="cpu", time="01:00:00", cpus_per_task=2,
                              job_name="tok")
    assert preprocess_datatrove(corpus, str(tmp_path / "dt"), options, append_eod=True) is None

    # what datatrove submitted: the tokenize array, its stats merger, the merge job after the array, its stats merger
    scripts = [(submitted / f"script_{i}").read_text() for i in range(4)]
    args = [(submitted / f"args_{i}").read_text().split() for i in range(4)]
    work = tmp_path / "dt.datatrove"
    for line in ("#SBATCH --array=0-2", "#SBATCH --partition=cpu", "#SBATCH --time=01:00:00",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --job-name=tok",
                 f"launch_pickled_pipeline {work / 'tokenize' / 'executor.pik'}"):
        assert line in scripts[0]
    assert "--qos" not in scripts[0]
    assert "#SBATCH --job-name=tok_merge" in scripts[2] and "#SBATCH --array=0-0" in scripts[2]
    assert f"launch_pickled_pipeline {work / 'merge' / 'executor.pik'}" in scripts[2]
    assert "--dependency=afterok:100" in args[2]

    # Slurm runs each array task as `launch_pickled_pipeline executor.pik` with SLURM_ARRAY_TASK_ID set
    handler = signal.getsignal(signal.SIGUSR1)  # datatrove's tasks install a requeue handler
    monkeypatch.setenv("SLURM_NODELIST", "node1")
    try:
        # an input changed between submission and a task's start is refused: its parts would not fit the others'
        stat = os.stat(corpus)
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
        monkeypatch.setattr(sys, "argv", ["launch_pickled_pipeline", str(work / "tokenize" / "executor.pik")])
        with pytest.raises(PreprocessError, match="changed since the job was planned"):
            launch_pickled_pipeline.main()
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        for stage, task_ids in (("tokenize", [2, 0, 1]), ("merge", [0])):
            for task_id in task_ids:
                monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task_id))
                monkeypatch.setattr(sys, "argv", ["launch_pickled_pipeline", str(work / stage / "executor.pik")])
                launch_pickled_pipeline.main()
    finally:
        signal.signal(signal.SIGUSR1, handler)
    assert same_bytes(str(tmp_path / "dt_text_document"), reference[False])


@pytest.mark.extended
def test_a_local_ray_instance_gives_the_same_bytes(tmp_path, corpus, reference):
    """Ray is pinned in scripts/requirements-extended.txt, which setup_env.sh installs for the extended tier only: a
    missing Ray fails this test under `MEGAHF_EXTENDED_TESTS=1 bash scripts/test.sh` and skips elsewhere. Ray's
    workers are fresh processes that import megahf (about a minute on 2 cores)."""
    ray = oracle("ray", "MEGAHF_EXTENDED_TESTS=1 bash scripts/setup_env.sh installs scripts/requirements-extended.txt")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = preprocess_datatrove(corpus, str(tmp_path / "dt"), append_eod=True,
                                      options=ExecutorOptions(executor="ray", tasks=3, mem_per_cpu_gb=0.5))
    finally:
        ray.shutdown()
    assert same_bytes(result.prefixes["text"], reference[False])


def test_ray_executors_carry_the_options(tmp_path, corpus):
    """What megahf hands datatrove's Ray executor (a Ray run: the extended test above)."""
    options = ExecutorOptions(executor="ray", tasks=5, workers=2, cpus_per_task=2, mem_per_cpu_gb=1.5)
    job = datatrove_steps.PreprocessJob(input=corpus, split="train", subset=None, keys=("text",), tokenizer="gpt2",
                                        settings=None, output_prefix=str(tmp_path / "o"), work_dir=str(tmp_path / "w"),
                                        tasks=5)
    tokenize, merge = _executors(job, options)
    assert (tokenize.tasks, tokenize.workers, tokenize.cpus_per_task, tokenize.mem_per_cpu_gb) == (5, 2, 2, 1.5)
    assert (merge.tasks, merge.depends) == (1, tokenize)
    assert isinstance(tokenize.pipeline[0], datatrove_steps.TokenizeShard)
    assert isinstance(merge.pipeline[0], datatrove_steps.MergeShards)


@pytest.mark.parametrize("cores, options, threads", [
    (2, dict(executor="local", tasks=2), 1),  # as many tasks at once as cores: one thread each
    (2, dict(executor="local", tasks=8, workers=2), 1),
    (16, dict(executor="local", tasks=8, workers=4), 4),
    (16, dict(executor="local", tasks=8, local_tasks=2), 8),
    (16, dict(executor="local", tasks=4, workers=1), None),  # one at a time: the tokenizer's own choice
    (16, dict(executor="ray", tasks=4, cpus_per_task=3), 3),
    (16, dict(executor="slurm", tasks=4, partition="p", time="1:00:00"), 1),  # Slurm's default: 1 CPU per task
], ids=["local-2-cores", "local-workers", "local-16-cores", "local-tasks", "one-at-a-time", "ray", "slurm"])
def test_the_tokenizer_threads_of_each_task(monkeypatch, cores, options, threads):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert _threads(ExecutorOptions(**options)) == threads


def test_a_task_sharing_the_cores_tokenizes_on_one_thread(tmp_path, corpus, reference, monkeypatch):
    """The limit is set in the task's process, before it tokenizes (here the task runs in this one)."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # restored after the test: the task changes it
    seen = []
    real = datatrove_steps.encode_chunk
    monkeypatch.setattr(datatrove_steps, "encode_chunk",
                        lambda *a: seen.append(os.environ.get("TOKENIZERS_PARALLELISM")) or real(*a))
    monkeypatch.setattr("megahf.data.preprocess_datatrove._threads", lambda options: 1)
    result = run_local(corpus, tmp_path / "dt", tasks=2)
    assert seen and set(seen) == {"false"}
    assert same_bytes(result.prefixes["text"], reference[False])


# ----------------------------------------------------------------------------------------------------- bad options
BASE = ["preprocess", "--input", "c.jsonl", "--tokenizer", "gpt2", "--output-prefix", "out/p"]


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "3"], "--tasks: datatrove options; add --executor local|slurm|ray"),
    (["--executor", "local", "--partition", "cpu"], "Slurm options; --executor local does not take them"),
    (["--executor", "local", "--cpus-per-task", "2"], "reserve resources on Slurm or Ray"),
    (["--executor", "slurm", "--time", "1:00:00"], "--executor slurm needs --partition"),
    (["--executor", "slurm", "--partition", "cpu", "--time", "1:00:00", "--mem-per-cpu-gb", "1.5"], "whole GB"),
    (["--executor", "ray", "--local-tasks", "1"], "--executor ray places the tasks itself"),
    (["--executor", "local", "--tasks", "4", "--local-tasks", "2", "--local-rank-offset", "3"],
     "must lie within the --tasks 4 tasks 0..3"),
    (["--executor", "local", "--tasks", "0"], "--tasks 0: need at least 1"),
], ids=["no-executor", "slurm-option", "local-cpus", "no-partition", "fractional-gb", "ray-local-tasks", "offset", "tasks"])
def test_bad_options_fail_in_one_line_before_anything_is_read(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)  # c.jsonl does not exist: the options are refused before the input is looked at
    assert cli_main(BASE + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("executor, missing, hint", [("local", "datatrove", "pip install 'megahf[distributed]'"),
                                                     ("ray", "ray", "pip install 'datatrove[ray]'")])
def test_a_missing_engine_is_named_with_its_install_command(tmp_path, corpus, monkeypatch, capsys, executor, missing,
                                                            hint):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as when not installed
    assert cli_main(["preprocess", "--input", corpus, "--tokenizer", "gpt2", "--output-prefix",
                     str(tmp_path / "p"), "--executor", executor]) == 2
    err = capsys.readouterr().err
    assert hint in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []
