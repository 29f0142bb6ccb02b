"""`final/` written by several ranks: published only once every rank is done with it (`_save_final_worker.py`)."""

from __future__ import annotations

from pathlib import Path

from conftest import run_torchrun

WORKER = Path(__file__).with_name("_save_final_worker.py")


def test_final_is_published_after_the_slowest_rank_saved(tmp_path):
    # Without the barrier before the rename, rank 1 fails with FileNotFoundError on the folder rank 0 published.
    report = run_torchrun(2, ["--workdir", str(tmp_path)], tmp_path / "report.json", worker=WORKER)
    assert report["files"] == ["model.safetensors", "tokenizer.json"]
    assert not list(tmp_path.glob(".final*")), "a partial folder was left behind"
