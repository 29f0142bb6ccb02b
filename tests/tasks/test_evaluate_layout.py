"""`megahf evaluate --tensor-parallel-size`: a size that does not fit the model or the launch is one line on stderr
before any weight is loaded; the data-parallel slices cover every example once, whatever the world size."""

from __future__ import annotations

import re

import pytest

from task_helpers import FIXTURES, run_cli
from megahf.parallel.layout import resolve_layout
from megahf.tasks import run as run_module
from megahf.tasks.distributed import EvaluationLayout


@pytest.mark.parametrize("task", ["lambada", "wikitext"])
@pytest.mark.parametrize("tp, world, expected", [
    (3, "1", r"--tensor-parallel-size 3 does not fit --model .*: num_attention_heads=2 is not divisible by "
             r"tensor_parallel_size=3"),
    (2, "3", r"--tensor-parallel-size 2: the world size 3 is not a multiple of tensor_parallel_size=2"),
    (0, "1", r"tensor_parallel_size=0 \(--tensor-parallel-size\): must be at least 1"),
])
def test_unfit_tensor_parallel_size_is_one_line_before_loading(saved_model, tmp_path, capsys, monkeypatch, task, tp,
                                                               world, expected):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the layout was checked")

    monkeypatch.setattr(run_module, "load_model", no_loading)
    monkeypatch.setenv("WORLD_SIZE", world)  # as a launcher of `world` processes sets it (no group is formed)
    data = FIXTURES / ("lambada_openai.jsonl" if task == "lambada" else "wiki.test.raw")
    out_json = tmp_path / "out.json"
    status, out, err = run_cli(["evaluate", task, "--model", str(saved_model), "--data", str(data),
                                "--tensor-parallel-size", str(tp), "--output-json", str(out_json), "--no-progress"],
                               capsys)
    assert status == 2 and out == "" and not out_json.exists()
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("megahf evaluate: error: ") and re.search(expected, last), last


@pytest.mark.parametrize("world, tp", [(1, 1), (2, 1), (2, 2), (4, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("num_items", [0, 1, 5, 15])
def test_replica_slices_cover_every_example_once_in_order(world, tp, num_items):
    layout = resolve_layout(world_size=world, tensor_parallel_size=tp)
    slices = [EvaluationLayout(layout, rank).my_slice(num_items) for rank in range(world)]
    for rank in range(world):  # the tensor-parallel ranks of a replica score the same examples
        assert slices[rank] == slices[rank - rank % tp]
    replicas = [list(range(num_items))[s] for s in slices[::tp]]
    assert [i for part in replicas for i in part] == list(range(num_items))
    assert max(map(len, replicas)) - min(map(len, replicas)) <= 1
