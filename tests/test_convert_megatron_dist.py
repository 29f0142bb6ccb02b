"""Megatron-Core's torch_dist format <-> megahf, with Megatron-Core itself on both ends: checkpoints written by
megatron-core 0.16.1's own `dist_checkpointing.save` (on CPU) convert to megahf models with Megatron-Core's logits, and
a checkpoint megahf writes loads with `dist_checkpointing.load` into a fresh Megatron-Core model that gives them
again. Its async writer calls `torch.cuda.synchronize` / `current_device` once per save and load: pointed at the CPU
here."""

from __future__ import annotations

import argparse

import pytest
import torch

import _megatron_checkpoints as mc
from megahf.convert import convert, read_checkpoint
from megahf.convert.common import build_model

VOCAB, PADDED = 1100, 1280  # a TP=2 run's padding; megahf keeps 1152 rows
IDS = torch.randint(0, VOCAB, (2, mc.SEQ), generator=torch.Generator().manual_seed(4))
TOL = dict(rtol=1e-5, atol=1e-5)  # same weights, float32, summation order only


@pytest.fixture
def cpu_dist_checkpointing(megatron_core, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    from megatron.core import dist_checkpointing
    return dist_checkpointing


def save_with_megatron(dist_checkpointing, model, args, root):
    """What Megatron-LM's save_checkpoint does with --ckpt-format torch_dist (model state, args and version)."""
    folder = root / "iter_0000010"
    folder.mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0,
                             "iteration": 10}, str(folder))
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    return root


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_megatron_core_torch_dist_checkpoint_both_ways(cpu_dist_checkpointing, tmp_path, style):
    model = mc.gpt_model(style, PADDED)
    args = mc.gpt_args(style, VOCAB, PADDED, 2, 1)
    root = save_with_megatron(cpu_dist_checkpointing, model, args, tmp_path / "megatron")
    expected = mc.gpt_logits(model, IDS)[..., :VOCAB]
    loaded = read_checkpoint("megatron-dist", root)
    assert loaded.layout["iteration"] == 10 and loaded.config.padded_vocab_size == 1152
    with torch.no_grad():
        torch.testing.assert_close(build_model(loaded)(input_ids=IDS).logits, expected, **TOL)

    report = convert(root, tmp_path / "megahf", "megatron-dist", "megahf", show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"] and report["round_trip"]["format"] == "megatron-dist"
    report = convert(tmp_path / "megahf", tmp_path / "back", "megahf", "megatron-dist", tp=2, show_progress=False)
    assert report["ok"]
    # Megatron-Core loads what megahf wrote, into a model of its own, and gives the same logits
    fresh = mc.gpt_model(style, PADDED)
    with torch.no_grad():
        for param in fresh.parameters():
            param.zero_()
    state = cpu_dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path / "back" / "release"))
    fresh.load_state_dict(state, strict=False)
    common = cpu_dist_checkpointing.load_common_state_dict(str(tmp_path / "back" / "release"))
    assert isinstance(common["args"], argparse.Namespace) and common["args"].padded_vocab_size == PADDED
    assert [name for name in mc.RESUME_ARGS if not hasattr(common["args"], name)] == []
    torch.testing.assert_close(mc.gpt_logits(fresh, IDS)[..., :VOCAB], expected, **TOL)


def test_megatron_core_torch_dist_checkpoint_with_llama3_rope_scaling(cpu_dist_checkpointing, tmp_path):
    """Megatron-LM's `--use-rope-scaling --rope-scaling-factor 32` in a torch_dist checkpoint's args: read as
    transformers' llama3 rope_parameters, with Megatron-Core's logits, and written back (the legacy format's test,
    tests/test_convert_megatron_rope.py, covers the other scalings and positions beyond 8192)."""
    rope_args = {"use_rope_scaling": True, "rope_scaling_factor": 32.0}
    model = mc.gpt_model("llama", PADDED, rope_args)
    root = save_with_megatron(cpu_dist_checkpointing, model, mc.gpt_args("llama", VOCAB, PADDED, 2, 1, rope_args),
                              tmp_path / "megatron")
    loaded = read_checkpoint("megatron-dist", root)
    assert loaded.config.rope_parameters == {"rope_type": "llama3", "rope_theta": 10000, "factor": 32.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}
    with torch.no_grad():
        torch.testing.assert_close(build_model(loaded)(input_ids=IDS).logits, mc.gpt_logits(model, IDS)[..., :VOCAB],
                                   **TOL)
    report = convert(root, tmp_path / "megahf", "megatron-dist", "megahf", show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"]
    convert(tmp_path / "megahf", tmp_path / "back", "megahf", "megatron-dist", tp=2, show_progress=False)
    common = cpu_dist_checkpointing.load_common_state_dict(str(tmp_path / "back" / "release"))
    assert {key: getattr(common["args"], key) for key in rope_args} == rope_args


def test_megatron_core_bert_torch_dist_checkpoint(cpu_dist_checkpointing, tmp_path):
    model = mc.bert_model(PADDED)
    root = save_with_megatron(cpu_dist_checkpointing, model, mc.bert_args(VOCAB, PADDED, 2, 1), tmp_path / "bert")
    ids = IDS.clamp(min=1)
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    types[:, 5:] = 1
    loaded = read_checkpoint("megatron-dist", root)
    with torch.no_grad():
        their_lm, their_order = model(ids, mask, tokentype_ids=types)
        out = build_model(loaded)(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(out.prediction_logits, their_lm[..., :VOCAB], **TOL)
    torch.testing.assert_close(out.seq_relationship_logits, their_order, **TOL)
    # and back: megahf -> torch_dist loads into a fresh Megatron-Core BertModel with the same outputs
    convert(root, tmp_path / "megahf", "megatron-dist", "megahf", show_progress=False)
    report = convert(tmp_path / "megahf", tmp_path / "back", "megahf", "megatron-dist", tp=2, show_progress=False)
    assert report["ok"]
    fresh = mc.bert_model(PADDED)
    with torch.no_grad():
        for param in fresh.parameters():
            param.zero_()
    fresh.load_state_dict(cpu_dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path / "back" / "release")),
                          strict=False)
    with torch.no_grad():
        lm, order = fresh(ids, mask, tokentype_ids=types)
    torch.testing.assert_close(lm[..., :VOCAB], their_lm[..., :VOCAB], **TOL)
    torch.testing.assert_close(order, their_order, **TOL)
