"""transformers' GPT-2, Llama and (Megatron)BERT folders, megahf folders and megahf training checkpoints through
`megahf convert`: the converted model gives the source's logits (transformers runs the source), converting back is
bit-exact, and the proof file says so; the CLI verb prints the proof and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import megahf
from megahf.cli import main
from megahf.convert import ConversionError, convert, read_checkpoint
from megahf.convert.common import build_model

IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(2))
TOL = dict(rtol=1e-5, atol=1e-5)  # same weights and float32 arithmetic up to summation order


def perturbed(model):
    with torch.no_grad():  # non-zero biases and norms, so that a swapped one cannot go unnoticed
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def gpt2_folder(path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=1000, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     activation_function="gelu_new")
    model = perturbed(transformers.GPT2LMHeadModel(config))
    model.save_pretrained(path)
    return model


def llama_folder(path, tied=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rope_theta=5000.0, tie_word_embeddings=tied)
    model = perturbed(transformers.LlamaForCausalLM(config))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("fmt, make", [("hf-gpt2", gpt2_folder), ("hf-llama", llama_folder)])
def test_transformers_causal_lm_to_megahf_gives_its_logits_and_round_trips(tmp_path, fmt, make):
    theirs = make(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "megahf", fmt, "megahf", show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"]
    assert report["probe"]["source_ran_as"].startswith("transformers ") and report["probe"]["source_ran_as_itself"]
    assert report["probe"]["max_abs_logit_diff"] <= report["probe"]["tolerance"]
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "megahf").eval()
    assert isinstance(ours, megahf.MegatronGPTForCausalLM) and ours.config.vocab_size == 1000
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, **TOL)
    # back to transformers: the same tensors bit for bit (megahf's 24 zero padding rows kept, vocab noted)
    convert(tmp_path / "megahf", tmp_path / "back", "megahf", fmt, show_progress=False)
    original = load_file(tmp_path / "src" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(back[key][: tensor.shape[0]], tensor), key
    assert json.loads((tmp_path / "back" / "config.json").read_text())["megahf_vocab_size"] == 1000


def test_gpt2_config_without_default_fields_reads_with_transformers_defaults(tmp_path):
    """A config.json that leaves out what equals transformers' defaults (as older writers and hand-made configs
    do) reads as transformers reads it."""
    torch.manual_seed(0)
    theirs = perturbed(transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2,
                                                                           n_head=4)))  # n_positions: the default
    theirs.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    defaults = transformers.GPT2Config().to_dict()
    kept = {k: v for k, v in config.items() if k == "model_type" or defaults.get(k, object()) != v}
    assert "n_positions" not in kept and "layer_norm_epsilon" not in kept  # what the reader needs, left out
    (tmp_path / "src" / "config.json").write_text(json.dumps(kept))
    loaded = read_checkpoint("hf-gpt2", tmp_path / "src")
    with torch.no_grad():
        torch.testing.assert_close(build_model(loaded)(input_ids=IDS).logits, theirs(input_ids=IDS).logits, **TOL)


def test_llama_rope_layout_matches_without_permutation(tmp_path):
    """megahf's RoPE rotates halves as transformers' Llama does: a permuted (interleaved) layout would change the
    logits at every position after the first, which this compares one by one."""
    theirs = llama_folder(tmp_path / "src", tied=True)
    loaded = read_checkpoint("hf-llama", tmp_path / "src")
    assert loaded.config.rotary_base == 5000 and loaded.config.tie_word_embeddings
    with torch.no_grad():
        ours, expected = build_model(loaded)(input_ids=IDS).logits, theirs(input_ids=IDS).logits
    for position in range(IDS.shape[1]):
        torch.testing.assert_close(ours[:, position], expected[:, position], **TOL)


@pytest.mark.parametrize("fmt, family", [("hf-megatron-bert", "MegatronBert"), ("hf-bert", "Bert")])
def test_transformers_bert_folder_to_megahf_and_megatron_and_back(tmp_path, fmt, family):
    torch.manual_seed(0)
    config_class = getattr(transformers, family + "Config")
    theirs = perturbed(getattr(transformers, family + "ForPreTraining")(config_class(
        vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        layer_norm_eps=1e-5)))
    theirs.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "megahf", fmt, "megahf", show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"], report
    if family == "MegatronBert":  # pre-LN BERT is Megatron's: it also goes to Megatron-LM at TP=2
        report = convert(tmp_path / "megahf", tmp_path / "megatron", "megahf", "megatron", tp=2, show_progress=False)
        assert report["ok"]
        loaded = read_checkpoint("megatron", tmp_path / "megatron")
        ids = IDS[:, :8]
        with torch.no_grad():
            ours = build_model(loaded)(input_ids=ids).prediction_logits
            torch.testing.assert_close(ours, theirs(input_ids=ids).prediction_logits[..., :1024], **TOL)
    else:
        with pytest.raises(ConversionError, match="post-LayerNorm; hf-megatron-bert holds pre-LN models: write it as "
                                                  "hf-bert"):
            convert(tmp_path / "megahf", tmp_path / "megatron", "megahf", "hf-megatron-bert", show_progress=False)


def test_megahf_training_checkpoint_converts_from_its_dcp_files(tmp_path):
    from transformers import TrainerState

    from megahf.training.checkpoint import save_checkpoint

    config = megahf.MegatronGPTConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=1000,
                                      max_position_embeddings=32, activation="swiglu", normalization="RMSNorm",
                                      position_embedding_type="rope", add_bias_linear=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = megahf.MegatronGPTForCausalLM(config).eval()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    fields = json.loads(json.dumps(config.to_dict()))
    step = save_checkpoint(tmp_path / "checkpoints", 7, model, optimizer, scheduler, TrainerState(),
                           {"model_config": fields}, keep_last=1)
    report = convert(step, tmp_path / "tp2", "megahf", "megatron", tp=2, show_progress=False)
    assert report["ok"] and report["source"]["layout"]["training_step"] == 7
    loaded = read_checkpoint("megatron", tmp_path / "tp2")
    with torch.no_grad():
        torch.testing.assert_close(build_model(loaded)(input_ids=IDS).logits, model(input_ids=IDS).logits, **TOL)


def test_cli_convert_prints_and_writes_the_proof(tmp_path, capsys):
    llama_folder(tmp_path / "src")
    status = main(["convert", "--from", "hf-llama", "--to", "megatron", str(tmp_path / "src"), str(tmp_path / "out"),
                   "--tp", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "round trip back to hf-llama: bit-exact" in out and "conversion.json" in out
    proof = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert {"command", "source", "target", "probe", "round_trip", "ok", "seconds", "notes"} <= proof.keys()
    assert proof["target"]["layout"] == {"tp": 2, "pp": 1, "names": "core"}
    # bad input: one line on stderr, exit status 2, nothing written
    status = main(["convert", "--from", "megahf", "--to", "hf-gpt2", str(tmp_path / "nothing"), str(tmp_path / "x"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("megahf convert: error: ") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    status = main(["convert", "--from", "hf-llama", "--to", "hf-gpt2", str(tmp_path / "src"), str(tmp_path / "x"),
                   "--no-progress", "--model-overrides", "vocab_size=900"])
    err = capsys.readouterr().err
    assert status == 2 and "cannot be written as hf-gpt2: GPT-2 has learned positions" in err


def test_bf16_checkpoint_keeps_its_dtype_and_is_proven_in_float32(tmp_path):
    config = megahf.MegatronGPTConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                      vocab_size=1000, max_position_embeddings=32, activation="swiglu",
                                      normalization="RMSNorm", position_embedding_type="rope", add_bias_linear=False)
    torch.manual_seed(0)
    megahf.MegatronGPTForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "llama", "megahf", "hf-llama", show_progress=False)
    assert report["ok"] and report["probe"]["max_abs_logit_diff"] <= report["probe"]["tolerance"]
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "llama" / "model.safetensors").values())
