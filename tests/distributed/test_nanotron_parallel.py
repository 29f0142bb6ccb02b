"""nanotron 0.4 at TP=2 (2 gloo ranks, `_nanotron_tp_worker.py`) against megahf's nanotron converter: a TP=1 folder
that megahf wrote loads into nanotron's TP=2 Llama through nanotron's own resharding loader (which parses the tensor
metadata strictly) and gives megahf's logits; the TP=2 shards nanotron then saves convert back to those logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_torchrun
from test_convert_nanotron import FP32_RTOL, GROUPS, HEADS, IDS, VOCAB, assert_logits_close, megahf_llama

from megahf.convert import convert, read_checkpoint
from megahf.convert.common import build_model

WORKER = Path(__file__).with_name("_nanotron_tp_worker.py")


@pytest.mark.extended
def test_nanotron_at_tp2_loads_megahfs_folder_and_its_shards_convert_back(tmp_path):
    ours = megahf_llama(tied=False, seed=4)
    ours.save_pretrained(tmp_path / "megahf")
    assert convert(tmp_path / "megahf", tmp_path / "from-megahf", "megahf", "nanotron", show_progress=False)["ok"]
    torch.save(IDS, tmp_path / "ids.pt")
    report = run_torchrun(2, ["--workdir", str(tmp_path)], tmp_path / "report.json", worker=WORKER)
    assert report["tp"] == 2
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits[..., :VOCAB]
    assert_logits_close(torch.load(report["logits"], weights_only=True)[..., :VOCAB], expected, FP32_RTOL)
    shards = sorted(p.name for p in (tmp_path / "tp2" / "model/model/decoder/0/pp_block/attn/qkv_proj").iterdir())
    assert shards == ["model_weight_pp-rank-0-of-1_tp-rank-0-of-2.safetensors",
                          "model_weight_pp-rank-0-of-1_tp-rank-1-of-2.safetensors"]
    loaded = read_checkpoint("nanotron", tmp_path / "tp2")
    assert loaded.config.num_attention_heads == HEADS and loaded.config.num_query_groups == GROUPS
    with torch.no_grad():
        assert_logits_close(build_model(loaded)(input_ids=IDS).logits[..., :VOCAB], expected, FP32_RTOL)
