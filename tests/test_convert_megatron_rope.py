"""RoPE scaling through Megatron-LM checkpoints, with Megatron-Core (megatron-core 0.16.1 on CPU) as the oracle.

A Llama-style GPTModel built as Megatron-LM builds it from its RoPE arguments (llama3 scaling `--use-rope-scaling
--rope-scaling-factor`, linear `--rotary-seq-len-interpolation-factor`, `--position-embedding-type yarn`), saved with
those arguments in the legacy and the torch_dist format, converts to a megahf model with transformers'
`rope_parameters` and Megatron-Core's logits; megahf writes the arguments back, and a GPTModel built from the written
arguments loads the written weights and gives those logits again. Megatron-Core's llama3 scaling is fixed to an
original context of 8192 tokens, which a whole-model forward cannot reach here: its frequencies beyond 8192 are compared
at the RoPE module."""

from __future__ import annotations


import pytest
import torch

import _megatron_checkpoints as mc
from megahf import MegatronGPTConfig
from megahf.convert import ConversionError, convert, read_checkpoint
from megahf.convert.common import build_model
from megahf.convert.megatron_rope import rope_parameters_from_args
from megahf.models.gpt.modeling_megatron_gpt import MegatronGPTRotaryEmbedding

VOCAB, PADDED = 1100, 1152
IDS = torch.randint(0, VOCAB, (2, mc.SEQ), generator=torch.Generator().manual_seed(5))
TOL = dict(rtol=1e-5, atol=1e-5)  # same weights, float32 logits of magnitude ~1, summation order and RoPE rounding
YARN_ORIGINAL = 8  # positions 8..11 of the 12-token probe lie beyond it
# Megatron-LM's arguments -> the rope_parameters megahf reads from them (theta 10000)
VARIANTS = {
    "llama3": ({"use_rope_scaling": True, "rope_scaling_factor": 32.0},
               {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}),
    "linear": ({"rotary_seq_len_interpolation_factor": 4}, {"rope_type": "linear", "factor": 4.0}),
    "yarn": ({"position_embedding_type": "yarn", "rotary_scaling_factor": 4.0, "yarn_beta_fast": 16.0,
              "yarn_original_max_position_embeddings": YARN_ORIGINAL},
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": YARN_ORIGINAL, "beta_fast": 16.0,
              "beta_slow": 1.0, "truncate": True}),
}




@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_rope_scaling_converts_both_ways_with_megatron_cores_logits(megatron_core, tmp_path, variant):
    rope_args, expected_rope = VARIANTS[variant]
    model = mc.gpt_model("llama", PADDED, rope_args)
    args = mc.gpt_args("llama", VOCAB, PADDED, 1, 1, rope_args)
    root = mc.save(mc.split(mc.core_state(model), 1, 1, swiglu=True, tied=False), tmp_path / "ckpt", args)
    expected = mc.gpt_logits(model, IDS)[..., :VOCAB]
    if variant != "llama3":  # the scaling shows in these logits (llama3's only beyond 8192: the test below)
        unscaled = mc.gpt_logits(mc.gpt_model("llama", PADDED), IDS)[..., :VOCAB]
        assert (unscaled - expected).abs().max() > 100 * TOL["atol"]

    loaded = read_checkpoint("megatron", root)
    assert loaded.config.rope_parameters == {**expected_rope, "rope_theta": 10000}
    with torch.no_grad():
        torch.testing.assert_close(build_model(loaded)(input_ids=IDS).logits, expected, **TOL)

    report = convert(root, tmp_path / "megahf", "megatron", "megahf", show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"]
    report = convert(tmp_path / "megahf", tmp_path / "back", "megahf", "megatron", show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"]
    # the proof's probe (megahf's model on both sides) crossed the end of the original context (llama3: 8192)
    original = expected_rope.get("original_max_position_embeddings", args.max_position_embeddings)
    assert report["probe"]["positions"][0] < original <= report["probe"]["positions"][1]
    shard = mc.load_shard(tmp_path / "back" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    written = vars(shard["args"])
    assert {key: written[key] for key in rope_args} == rope_args
    # Megatron-Core builds its model from the written arguments, loads the written weights and agrees
    fresh = mc.gpt_model("llama", PADDED, written)
    fresh.load_state_dict(shard["model"], strict=True)
    torch.testing.assert_close(mc.gpt_logits(fresh, IDS)[..., :VOCAB], expected, **TOL)


def test_llama3_frequencies_beyond_8192_equal_megatron_cores_rope(megatron_core, monkeypatch):
    """Llama 3.2 1B's RoPE as Megatron-LM's arguments give it (`--rotary-base 500000 --use-rope-scaling
    --rope-scaling-factor 32`), at positions 8180..8199: megahf's cos and sin from the rope_parameters it reads from
    those arguments, against Megatron-Core's RotaryEmbedding built from them as GPTModel builds it. The angles are
    position x frequency in float32 on both sides; a frequency one ulp apart would move an angle of ~8200 radians by
    ~2 ulps of 8200, hence the tolerance; a wrong scaling moves them by whole radians."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # where its forward puts the frequencies
    args = mc.gpt_args("llama", VOCAB, PADDED, 1, 1, {"rotary_base": 500000, "use_rope_scaling": True,
                                                      "rope_scaling_factor": 32.0})
    rope = rope_parameters_from_args(args, "rope", [])
    assert rope == MegatronGPTConfig.from_preset("llama-3.2-1b").rope_parameters
    config = MegatronGPTConfig.from_preset("llama-3.2-1b", num_layers=1, rope_parameters=rope)
    theirs = RotaryEmbedding(config.head_dim, args.rotary_percent, rotary_base=args.rotary_base,
                             rope_scaling=args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor,
                             use_cpu_initialization=True)
    ours = MegatronGPTRotaryEmbedding(config)
    torch.testing.assert_close(ours.inv_freq, theirs.inv_freq, rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    angles = theirs(20, offset=8180)[:, 0, 0]
    cos, sin = ours(torch.zeros(1), torch.arange(8180, 8200)[None])
    tolerance = 2 * 8200 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(cos[0], angles.cos(), rtol=0, atol=tolerance)
    torch.testing.assert_close(sin[0], angles.sin(), rtol=0, atol=tolerance)


def test_rope_megatron_cannot_compute_is_refused_before_writing(tmp_path):
    from megahf import MegatronGPTForCausalLM

    for rope, message in [({"rope_type": "dynamic", "factor": 2.0}, "Megatron-Core has no 'dynamic' RoPE"),
                          ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 32}, "llama3 scaling is fixed at"),
                          ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                            "attention_factor": 1.5}, "not an attention_factor")]:
        config = MegatronGPTConfig.from_preset("llama-tiny", num_layers=1, hidden_size=64, num_attention_heads=4,
                                               num_query_groups=2, ffn_hidden_size=96, rope_parameters=rope)
        MegatronGPTForCausalLM(config).save_pretrained(tmp_path / "src")
        for fmt in ("megatron", "megatron-dist"):
            with pytest.raises(ConversionError, match=message):
                convert(tmp_path / "src", tmp_path / "dst", "megahf", fmt, show_progress=False)
            assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("args, message", [
    ({"use_rope_scaling": True, "rotary_seq_len_interpolation_factor": 2}, "two RoPE scalings"),
    ({"position_embedding_type": "yarn", "mscale": 0.5, "mscale_all_dim": 0.0}, "mscale=0.5"),
])
def test_megatron_rope_args_megahf_cannot_compute_are_refused(megatron_core, tmp_path, args, message):
    model = mc.gpt_model("llama", PADDED)
    root = mc.save(mc.split(mc.core_state(model), 1, 1, swiglu=True, tied=False), tmp_path / "ckpt",
                   mc.gpt_args("llama", VOCAB, PADDED, 1, 1, args))
    with pytest.raises(ConversionError, match=message):
        read_checkpoint("megatron", root)
