"""Megatron-LM legacy checkpoints <-> megahf, with Megatron-Core (megatron-core 0.16.1 on CPU) as the oracle: real
GPTModels (GPT-2 style; Llama style with GQA, SwiGLU, RoPE, untied) and a BertModel, saved as Megatron-LM saves them
at TP=1 and split TP=2 x PP=2 by `_megatron_checkpoints` (written from Megatron's rules, not from megahf's code),
convert to megahf models whose logits equal Megatron-Core's own forward; megahf -> megatron writes what that splitter
writes and loads back bit-exact; hostile and broken checkpoints are refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import _megatron_checkpoints as mc
from megahf.convert import ConversionError, convert, read_checkpoint, write_checkpoint
from megahf.convert.common import build_model

VOCAB = 1100  # megahf pads to 1152; Megatron to 1152 at TP=1, 1280 at TP=2, 1536 at TP=4
PADDED = {1: 1152, 2: 1280, 4: 1536}
IDS = torch.randint(0, VOCAB, (2, mc.SEQ), generator=torch.Generator().manual_seed(1))
# Same weights, float32, same operations up to summation order: differences are rounding, a few ulps of logits of
# magnitude ~1-10.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def models(megatron_core):
    """Megatron-Core models whose vocabulary is padded as a TP=2 run pads it (1280 rows for 1100 tokens)."""
    return {"gpt2": mc.gpt_model("gpt2", PADDED[2]), "llama": mc.gpt_model("llama", PADDED[2])}


def megahf_logits(path, fmt="megatron", **overrides):
    loaded = read_checkpoint(fmt, path, overrides or None)
    with torch.no_grad():
        return build_model(loaded)(input_ids=IDS).logits, loaded


def write_core_checkpoint(tmp_path, model, style, tp, pp, name="ckpt", **save_kwargs):
    swiglu, tied = style == "llama", style == "gpt2"
    shards = mc.split(mc.core_state(model), tp, pp, swiglu=swiglu, tied=tied)
    return mc.save(shards, tmp_path / name, mc.gpt_args(style, VOCAB, PADDED[2], tp, pp), **save_kwargs)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
def test_megatron_core_gpt_checkpoint_gives_megatron_cores_logits(models, tmp_path, style, tp, pp):
    model = models[style]
    root = write_core_checkpoint(tmp_path, model, style, tp, pp)
    expected = mc.gpt_logits(model, IDS)[..., :VOCAB]
    actual, loaded = megahf_logits(root)
    assert loaded.layout["tp"] == tp and loaded.layout["pp"] == pp and loaded.layout["names"] == "core"
    assert loaded.config.padded_vocab_size == 1152  # re-padded from Megatron's 1280 to megahf's 128 multiple
    assert (loaded.config.activation, loaded.config.position_embedding_type) == (
        ("swiglu", "rope") if style == "llama" else ("gelu", "learned_absolute"))
    assert loaded.config.num_query_groups == (2 if style == "llama" else 4)
    torch.testing.assert_close(actual, expected, **TOL)


def test_legacy_names_checkpoint_version_1_and_transformer_engine_names(models, tmp_path):
    """The same GPT-2-style weights under legacy names (nested dicts, QKV in version 1.0's [heads, head size, 3]
    order, the tied head copy as word_embeddings_for_head) and under Transformer Engine's fused-norm names."""
    model = models["gpt2"]
    expected = mc.gpt_logits(model, IDS)[..., :VOCAB]
    shards = mc.split(mc.core_state(model), 2, 2, swiglu=False, tied=True)
    args = mc.gpt_args("gpt2", VOCAB, PADDED[2], 2, 2)
    legacy = {key: mc.to_legacy(shard, heads_per_rank=mc.HEADS // 2, version=1.0) for key, shard in shards.items()}
    mc.save(legacy, tmp_path / "legacy", args, version=1.0)
    te = {key: mc.to_te_names(shard) for key, shard in shards.items()}
    mc.save(te, tmp_path / "te", args, iteration=None)
    for name, naming in (("legacy", "legacy"), ("te", "te")):
        actual, loaded = megahf_logits(tmp_path / name)
        assert loaded.layout["names"] == naming
        torch.testing.assert_close(actual, expected, **TOL)
    # a version-1.0 file read as if it were 2.0 would scramble the heads: the ordering matters, the test can fail
    loaded = read_checkpoint("megatron", tmp_path / "legacy")
    assert loaded.layout["checkpoint_version"] == 1.0


def test_megatron_core_bert_checkpoint_gives_megatron_cores_logits(megatron_core, tmp_path):
    model = mc.bert_model(PADDED[2])
    shards = mc.split(mc.core_state(model), 2, 2, swiglu=False, tied=True)
    root = mc.save(shards, tmp_path / "bert", mc.bert_args(VOCAB, PADDED[2], 2, 2))
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, mc.SEQ), generator=generator)
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        their_lm, their_order = model(ids, mask, tokentype_ids=types)
        loaded = read_checkpoint("megatron", root)
        out = build_model(loaded)(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert loaded.model_class == "MegatronBertForPreTraining"
    torch.testing.assert_close(out.prediction_logits, their_lm[..., :VOCAB], **TOL)
    torch.testing.assert_close(out.seq_relationship_logits, their_order, **TOL)
    # megahf -> megatron at TP=1: Megatron-Core's BertModel loads it with a strict load_state_dict, same outputs
    convert(root, tmp_path / "megahf", "megatron", "megahf", show_progress=False)
    assert convert(tmp_path / "megahf", tmp_path / "tp1", "megahf", "megatron", show_progress=False)["ok"]
    fresh = mc.bert_model(1152)
    fresh.load_state_dict(mc.load_shard(tmp_path / "tp1" / "release" / "mp_rank_00" / "model_optim_rng.pt")["model"],
                          strict=True)
    with torch.no_grad():
        lm, order = fresh(ids, mask, tokentype_ids=types)
    torch.testing.assert_close(lm[..., :VOCAB], their_lm[..., :VOCAB], **TOL)
    torch.testing.assert_close(order, their_order, **TOL)


def test_megahf_to_megatron_tp2_writes_megatrons_split_and_round_trips_bit_exact(models, tmp_path):
    """megahf -> megatron at TP=2 x PP=2: every shard equals the oracle splitter's, Megatron-Core loads the TP=1
    output strictly, and converting back is bit-exact (the proof in conversion.json says so too)."""
    model = models["llama"]
    root = write_core_checkpoint(tmp_path, model, "llama", 1, 1)
    report = convert(root, tmp_path / "hf", "megatron", "megahf", show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"]
    assert report["probe"]["max_abs_logit_diff"] == 0.0  # the same megahf model on both sides
    # ... because Megatron did not run: the proof says so, rather than reading as a check against Megatron's numbers
    assert not report["probe"]["source_ran_as_itself"] and report["probe"]["target_ran_as_itself"]
    assert report["probe"]["source_ran_as"].endswith("(Megatron-LM itself did not run)")
    report = convert(tmp_path / "hf", tmp_path / "tp2", "megahf", "megatron", tp=2, pp=2, show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"] and report["round_trip"]["format"] == "megahf"
    assert json.loads((tmp_path / "tp2" / "conversion.json").read_text()) == report
    assert (tmp_path / "tp2" / "latest_checkpointed_iteration.txt").read_text() == "release"
    # the written shards are Megatron's split (at TP=2 the vocabulary is padded to 1280 again: with zero rows)
    state = mc.core_state(model)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        state[key][1152:] = 0  # megahf kept 1152 rows; Megatron's padding to 1280 at TP=2 adds zero rows
    expected = mc.split(state, 2, 2, swiglu=True, tied=False)
    for (t, p), shard in expected.items():
        written = mc.load_shard(tmp_path / "tp2" / "release" / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt")
        tensors = {k: v for k, v in written["model"].items() if v is not None}
        assert tensors.keys() == shard.keys(), (t, p)
        for key, tensor in shard.items():
            assert torch.equal(tensors[key], tensor), (t, p, key)
        assert written["args"].tensor_model_parallel_size == 2 and written["args"].swiglu
    # and Megatron-Core loads a megahf-written TP=1 checkpoint with a strict load_state_dict
    convert(tmp_path / "hf", tmp_path / "tp1", "megahf", "megatron", show_progress=False)
    written = mc.load_shard(tmp_path / "tp1" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    fresh = mc.gpt_model("llama", 1152)
    fresh.load_state_dict(written["model"], strict=True)
    torch.testing.assert_close(mc.gpt_logits(fresh, IDS)[..., :VOCAB], mc.gpt_logits(model, IDS)[..., :VOCAB], **TOL)


def test_written_args_hold_what_megatron_lm_reads_when_it_resumes(models, tmp_path):
    """Every arg Megatron-LM's check_checkpoint_args reads without a default is in the args megahf writes:
    `tokenizer_type` is the source checkpoint's where it has one, else that of megahf's GPT-2 tokenizer."""
    root = write_core_checkpoint(tmp_path, models["llama"], "llama", 1, 1)  # tokenizer_type HuggingFaceTokenizer
    write_checkpoint("megatron", read_checkpoint("megatron", root), tmp_path / "again", show_progress=False)
    convert(root, tmp_path / "hf", "megatron", "megahf", proof=False, show_progress=False)
    write_checkpoint("megatron", read_checkpoint("megahf", tmp_path / "hf"), tmp_path / "from-megahf",
                     show_progress=False)
    for folder, tokenizer in [("again", "HuggingFaceTokenizer"), ("from-megahf", "GPT2BPETokenizer")]:
        args = mc.load_shard(tmp_path / folder / "release" / "mp_rank_00" / "model_optim_rng.pt")["args"]
        assert [name for name in mc.RESUME_ARGS if not hasattr(args, name)] == [], folder
        assert args.tokenizer_type == tokenizer and args.data_parallel_random_init is False


def test_tp4_checkpoint_converts_and_reloads_at_tp2_and_tp1(megatron_core, tmp_path):
    model = mc.gpt_model("gpt2", PADDED[4])
    shards = mc.split(mc.core_state(model), 4, 1, swiglu=False, tied=True)
    root = mc.save(shards, tmp_path / "tp4", mc.gpt_args("gpt2", VOCAB, PADDED[4], 4, 1))
    expected, _ = megahf_logits(root)
    torch.testing.assert_close(expected, mc.gpt_logits(model, IDS)[..., :VOCAB], **TOL)
    convert(root, tmp_path / "hf", "megatron", "megahf", show_progress=False)
    for tp in (2, 1):
        report = convert(tmp_path / "hf", tmp_path / f"tp{tp}", "megahf", "megatron", tp=tp, show_progress=False)
        assert report["ok"]
        actual, loaded = megahf_logits(tmp_path / f"tp{tp}")
        assert loaded.layout["tp"] == tp
        assert torch.equal(actual, expected)


def test_vocab_size_unknown_keeps_every_row_and_says_so(models, tmp_path):
    root = write_core_checkpoint(tmp_path, models["gpt2"], "gpt2", 1, 1)
    args_free = mc.gpt_args("gpt2", VOCAB, PADDED[2], 1, 1)
    del args_free.vocab_size
    shards = mc.split(mc.core_state(models["gpt2"]), 1, 1, swiglu=False, tied=True)
    mc.save(shards, tmp_path / "novocab", args_free)
    loaded = read_checkpoint("megatron", tmp_path / "novocab")
    assert loaded.config.vocab_size == PADDED[2] and any("vocab_size" in note for note in loaded.notes)
    loaded = read_checkpoint("megatron", tmp_path / "novocab", {"vocab_size": VOCAB})
    assert loaded.config.vocab_size == VOCAB
    del root


class Hostile:
    def __reduce__(self):
        return (os.system, ("echo hostile",))


def test_hostile_pickle_is_refused_naming_the_class_and_the_flag(models, tmp_path):
    shards = mc.split(mc.core_state(models["gpt2"]), 1, 1, swiglu=False, tied=True)
    args = mc.gpt_args("gpt2", VOCAB, PADDED[2], 1, 1)
    args.payload = Hostile()
    root = mc.save(shards, tmp_path / "evil", args)
    with pytest.raises(ConversionError, match=r"refused: it references posix\.system.*--trust-pickle"):
        convert(root, tmp_path / "out", "megatron", "megahf", show_progress=False)
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_bad_checkpoints_are_clear_errors_before_anything_is_written(models, tmp_path):
    model = models["gpt2"]
    root = write_core_checkpoint(tmp_path, model, "gpt2", 2, 2)
    out = tmp_path / "out"

    def refused(source, pattern, **kwargs):
        with pytest.raises(ConversionError, match=pattern):
            convert(source, out, kwargs.pop("from_format", "megatron"), kwargs.pop("to_format", "megahf"),
                    show_progress=False, **kwargs)
        assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())

    # a missing shard
    broken = tmp_path / "missing"
    shutil.copytree(root, broken)
    shutil.rmtree(broken / "iter_0001000" / "mp_rank_01_001")
    refused(broken, r"missing shard: .*mp_rank_01_001")
    # a shape that does not fit the config
    shards = mc.split(mc.core_state(model), 1, 1, swiglu=False, tied=True)
    shards[(0, 0)]["decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(64, 100)
    mc.save(shards, tmp_path / "shape", mc.gpt_args("gpt2", VOCAB, PADDED[2], 1, 1))
    refused(tmp_path / "shape", r"decoder\.layers\.1\.mlp\.linear_fc2\.weight has shape \[64, 100\] but the config "
                                r"gives \[64, 256\]")
    # an unknown key
    shards = mc.split(mc.core_state(model), 1, 1, swiglu=False, tied=True)
    shards[(0, 0)]["decoder.layers.0.self_attention.q_layernorm.weight"] = torch.ones(16)
    mc.save(shards, tmp_path / "unknown", mc.gpt_args("gpt2", VOCAB, PADDED[2], 1, 1))
    refused(tmp_path / "unknown", r"unknown key 'decoder\.layers\.0\.self_attention\.q_layernorm\.weight'")
    # a TP that does not divide the model, and a DST that exists
    refused(root, r"num_attention_heads=4 is not divisible by --tp 3", to_format="megatron", tp=3)
    refused(root, r"num_layers=4 is not divisible by --pp 3", to_format="megatron", pp=3)
    out.mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert(root, out, "megatron", "megahf", show_progress=False)


@pytest.mark.parametrize("names", ["legacy", "te"])
def test_megahf_to_megatron_under_legacy_and_transformer_engine_names(models, tmp_path, names):
    root = write_core_checkpoint(tmp_path, models["gpt2"], "gpt2", 1, 1)
    convert(root, tmp_path / "hf", "megatron", "megahf", show_progress=False)
    report = convert(tmp_path / "hf", tmp_path / names, "megahf", "megatron", tp=2, pp=2, megatron_names=names,
                     show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"]
    first, last = (mc.load_shard(tmp_path / names / "release" / f"mp_rank_00_{p:03d}" / "model_optim_rng.pt")["model"]
                   for p in (0, 1))
    if names == "legacy":  # nested as megatron/legacy/model saves it; the tied head copy on the last stage
        assert set(first) == {"language_model"} and "layers.0.self_attention.query_key_value.weight" in \
            first["language_model"]["encoder"]
        assert "word_embeddings_for_head" in last
    else:
        assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in first
        assert "decoder.layers.0.input_layernorm.weight" not in first
    loaded = read_checkpoint("megatron", tmp_path / names)
    assert loaded.layout["names"] == names
    with torch.no_grad():
        torch.testing.assert_close(build_model(loaded)(input_ids=IDS).logits,
                                   mc.gpt_logits(models["gpt2"], IDS)[..., :VOCAB], **TOL)


def test_megatron_checkpoint_reads_without_megatron_imported(models, tmp_path):
    """The args hold Megatron enums and the RNG state numpy arrays: a fresh interpreter that never imports megatron
    (so none of megatron.core's registered safe globals) reads it through megahf's allow-list and stand-ins."""
    import subprocess
    import sys

    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    args = mc.gpt_args("gpt2", VOCAB, PADDED[2], 1, 1)
    args.model_type, args.attention_backend = ModelType.encoder_or_decoder, AttnBackend.auto
    shards = mc.split(mc.core_state(models["gpt2"]), 1, 1, swiglu=False, tied=True)
    root = mc.save(shards, tmp_path / "enums", args)
    code = ("import sys; from megahf.convert import read_checkpoint; "
            f"loaded = read_checkpoint('megatron', {str(root)!r}); "
            "assert not any(m.startswith('megatron') for m in sys.modules), 'megatron was imported'; "
            "print(loaded.config.num_layers, loaded.layout['iteration'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(mc.LAYERS), "1000"]
