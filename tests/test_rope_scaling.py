"""RoPE scaling as transformers defines it, on megahf's Llama-style GPT: with each RoPE type transformers computes for
Llama, megahf gives the logits of transformers' own `LlamaForCausalLM` with the same weights, at positions beyond
the context the model was pretrained at; and `megahf convert` carries the scaling from a Llama folder and back."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import megahf
from megahf.convert import convert, read_checkpoint
from megahf.convert.common import build_model

ORIGINAL, CONTEXT, SEQ = 32, 128, 48  # pretrained context, scaled context, probe length (positions 32..47 beyond)
HEAD_DIM = 16
ROPE = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    # dynamic NTK scales beyond max_position_embeddings, the context it was pretrained at (set to ORIGINAL below)
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 16.0},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                 "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
                 "long_factor": [1.0 + 0.5 * i for i in range(HEAD_DIM // 2)]},
    # theta 5000, head 16: wavelengths 6.3 (below 32/4: kept), 18 (between: smoothed), 53 and up (above 32: divided)
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
}
IDS = torch.randint(0, 1000, (2, SEQ), generator=torch.Generator().manual_seed(3))


def llama(rope_type: str, state: dict | None = None) -> transformers.LlamaForCausalLM:
    """A tiny Llama with GQA and the RoPE type's parameters (theta 5000); its norms perturbed so none is trivial."""
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=ORIGINAL if rope_type == "dynamic" else CONTEXT,
        rope_parameters={**ROPE[rope_type], "rope_theta": 5000.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Equal to 1e-5 of the logits' magnitude: the same weights and the same RoPE function, with float32 sums taken in
    another order (megahf's fused QKV and split gate/up) that differ by a few ulps (~1e-7 relative). Returns the
    tolerance."""
    tolerance = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=tolerance)
    return tolerance


@pytest.mark.parametrize("rope_type", ROPE)
def test_each_rope_type_gives_transformers_llama_logits_beyond_the_original_context(tmp_path, rope_type):
    theirs = llama(rope_type)
    theirs.save_pretrained(tmp_path)
    ours = build_model(read_checkpoint("hf-llama", tmp_path))
    assert ours.config.rope_parameters == theirs.config.rope_parameters
    with torch.no_grad():
        actual, expected = ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    tolerance = assert_same_logits(actual, expected)
    if rope_type == "default":
        return
    # the positions beyond the original context are where the type shows: there the same weights with unscaled
    # RoPE are far outside the tolerance (so the comparison above could not pass with the scaling ignored)
    with torch.no_grad():
        unscaled = llama("default", state=theirs.state_dict())(input_ids=IDS).logits
    assert (unscaled[:, ORIGINAL:] - expected[:, ORIGINAL:]).abs().max() > 100 * tolerance


@pytest.mark.parametrize("rope_type", ["llama3", "yarn", "dynamic"])
def test_scaled_llama_folder_converts_to_megahf_and_back_with_its_rope_parameters(tmp_path, rope_type):
    theirs = llama(rope_type)
    theirs.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "megahf", "hf-llama", "megahf", show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"]
    # the proof's probe ran both models (transformers' Llama from the folder, megahf's from the written folder) at
    # positions across the end of the pretrained context
    probe = report["probe"]
    assert probe["source_ran_as"] == "transformers LlamaForCausalLM" and probe["within_tolerance"]
    assert probe["positions"][0] < ORIGINAL <= probe["positions"][1]
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "megahf").eval()
    assert isinstance(ours, megahf.MegatronGPTForCausalLM)
    assert ours.config.rope_parameters == theirs.config.rope_parameters
    with torch.no_grad():
        assert_same_logits(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)
    convert(tmp_path / "megahf", tmp_path / "back", "megahf", "hf-llama", show_progress=False)
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["rope_parameters"] == theirs.config.rope_parameters


def test_legacy_rope_scaling_in_a_llama_folder_is_read(tmp_path):
    """A config.json from before transformers 5 (`rope_scaling` with `type`, top-level `rope_theta`), as Llama 3.1's
    on the Hub: read as transformers' LlamaConfig reads it."""
    theirs = llama("llama3")
    theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = {**{k: v for k, v in rope.items() if k != "rope_type"}, "type": "llama3"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    expected = transformers.LlamaConfig.from_pretrained(tmp_path).rope_parameters
    assert read_checkpoint("hf-llama", tmp_path).config.rope_parameters == expected
