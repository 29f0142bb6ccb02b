"""nanotron's Llama checkpoints <-> megahf, against nanotron 0.4's own code (PyPI, run on the CPU by
tests/_nanotron_cpu.py): checkpoints that nanotron builds, initialises and saves itself (untied, tied, bf16) convert
through `megahf convert --from nanotron` to megahf and transformers Llama folders that give nanotron's own logits, and
megahf models written as nanotron load with nanotron's loader and give megahf's logits in nanotron's forward."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
import transformers
from _nanotron_cpu import (FlashRotaryEmbedding, build_llama, cpu_parallel_context, import_nanotron, llama_logits,
                           nanotron_rotary, save_llama)
from safetensors import safe_open
from safetensors.torch import save_file

import megahf
from megahf.cli import main
from megahf.convert import ConversionError, convert, read_checkpoint
from megahf.convert.common import build_model

VOCAB, HIDDEN, HEADS, GROUPS, FFN, LAYERS, POSITIONS = 256, 64, 4, 2, 96, 2, 32
HEAD_DIM = HIDDEN // HEADS
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
# the same weights in float32, different code: summation order only (a few hundred ulps of the logits at most),
# while a misread RoPE layout moves the logits by a tenth of their scale (position 0 alone, where RoPE is the
# identity, would still agree)
FP32_RTOL = 1e-5
# bf16 keeps 8 significant bits: two implementations of the same bf16 forward round differently at each of the ~10
# rounding points of a layer, by up to half a bf16 ulp (2^-9 relative) each; 2^-6 of the logits' scale bounds that
# for this 2-layer model (0.4-0.6 % measured) and still fails a misread layout (10-22 %)
BF16_RTOL = 2.0**-6
CASES = {"untied": (False, torch.float32), "tied": (True, torch.float32), "bf16": (False, torch.bfloat16)}


def nanotron_config(nt, tied: bool):
    return nt.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, num_key_value_heads=GROUPS, max_position_embeddings=POSITIONS,
                          tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def nanotron(tmp_path_factory):
    """nanotron 0.4 on a one-process gloo group, and the three checkpoints it built and saved, with its logits."""
    nt = import_nanotron()
    root = tmp_path_factory.mktemp("nanotron")
    with pytest.MonkeyPatch.context() as patch, cpu_parallel_context(nt, patch) as context:
        runs = {}
        for seed, (name, (tied, dtype)) in enumerate(CASES.items()):
            config = nanotron_config(nt, tied)
            model = build_llama(nt, context, config, dtype, seed)
            folder = save_llama(nt, context, model, config, root / name)
            runs[name] = types.SimpleNamespace(folder=folder, dtype=dtype, logits=llama_logits(model, IDS))
        yield types.SimpleNamespace(nt=nt, context=context, runs=runs)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """|actual - expected| <= rtol x the largest |logit|: relative to the logits' scale, not per element (a logit
    near zero has no meaningful relative error)."""
    scale = expected.abs().max().item()
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= rtol * scale, f"max |diff| {diff:.3g} > {rtol:.3g} x {scale:.3g}"


def test_the_rotary_stand_in_rotates_as_nanotrons_own_rope():
    """The flash_attn RotaryEmbedding stand-in (interleaved, as nanotron 0.4's forward asks) equals nanotron's own
    RotaryEmbedding (its inference path's, its frequencies computed by its own code) on queries and keys."""
    nt = import_nanotron()
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, HEADS, HEAD_DIM, generator=generator)
    kv = torch.randn(2, 12, 2, GROUPS, HEAD_DIM, generator=generator)
    ours_q, ours_kv = FlashRotaryEmbedding(HEAD_DIM, interleaved=True)(q, kv=kv)
    theirs = nanotron_rotary(nt, HEAD_DIM, POSITIONS)
    positions = torch.arange(12)[None].expand(2, -1)
    # float32 rotations of values of order 1: a few ulps
    torch.testing.assert_close(ours_q, theirs(q, position_ids=positions), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_kv[:, :, 0], theirs(kv[:, :, 0], position_ids=positions), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_kv[:, :, 1], kv[:, :, 1], rtol=0, atol=0)  # values are not rotated
    halves, _ = FlashRotaryEmbedding(HEAD_DIM, interleaved=False)(q, kv=kv)
    assert (halves - ours_q).abs().max() > 0.1  # the layouts differ: the comparison above can tell them apart


@pytest.mark.parametrize("case", CASES)
def test_nanotrons_checkpoint_converts_with_nanotrons_logits(nanotron, tmp_path, case, capsys):
    run = nanotron.runs[case]
    shapes = [meta.get("unsharded_shape", "") for meta in _metadata(run.folder).values()]
    assert any("np.int64(" in shape for shape in shapes)  # numpy 2's shapes, as nanotron wrote them, are read
    status = main(["convert", "--from", "nanotron", "--to", "megahf", str(run.folder), str(tmp_path / "megahf"),
                   "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "nanotron did not run here: the probe checks the target against megahf's reading of the source" in out
    proof = json.loads((tmp_path / "megahf" / "conversion.json").read_text())
    assert proof["source"]["layout"] == {"rope_interleaved": True}  # nanotron 0.4 writes no such field
    assert any("no rope_interleaved" in note for note in proof["notes"])
    assert proof["probe"]["source_ran_as_itself"] is False and "nanotron" in proof["probe"]["source_ran_as"]
    # the proof of this one would repeat the one above (megahf's reading of the same source): the logits below decide
    convert(run.folder, tmp_path / "llama", "nanotron", "hf-llama", show_progress=False, proof=False)
    ours = megahf.MegatronGPTForCausalLM.from_pretrained(tmp_path / "megahf").eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert ours.dtype == theirs.dtype == run.dtype  # the stored dtype is kept
    rtol = FP32_RTOL if run.dtype == torch.float32 else BF16_RTOL
    with torch.no_grad():
        for model in (ours, theirs):
            assert_logits_close(model(input_ids=IDS).logits[..., :VOCAB], run.logits, rtol)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_megahf_written_as_nanotron_loads_in_nanotron_with_megahfs_logits(nanotron, tmp_path, tied):
    """megahf -> nanotron: nanotron 0.4's loader (load_weights) fills its Llama from the folder, the config it
    needs comes from the written model_config.json, and its forward gives megahf's logits."""
    nt = nanotron.nt
    ours = megahf_llama(tied, seed=3)
    ours.save_pretrained(tmp_path / "megahf")
    report = convert(tmp_path / "megahf", tmp_path / "nanotron", "megahf", "nanotron", show_progress=False)
    assert report["ok"]
    written = json.loads((tmp_path / "nanotron" / "model_config.json").read_text())
    known = {field.name for field in dataclasses.fields(nt.LlamaConfig)}
    # what nanotron 0.4's LlamaConfig lacks is what it computes anyway (no biases, interleaved RoPE, base 10000)
    assert {key: written[key] for key in set(written) - known} == {
        "attention_bias": False, "rope_interleaved": True, "rope_theta": 10000.0}
    nt_config = nt.LlamaConfig(**{key: value for key, value in written.items() if key in known})
    model = build_llama(nt, nanotron.context, nt_config, torch.float32, seed=99)  # random weights, then overwritten
    nt.load_weights(model=model, parallel_context=nanotron.context, root_folder=tmp_path / "nanotron")
    from nanotron.serialize.metadata import TensorMetadata
    for path, meta in _metadata(tmp_path / "nanotron").items():  # nanotron's own parser takes every metadata
        if meta:
            parsed = TensorMetadata.from_str_dict(meta)
            with safe_open(str(path), framework="pt") as f:
                assert tuple(parsed.unsharded_shape) == tuple(f.get_slice("data").get_shape())
    with torch.no_grad():
        expected = ours(input_ids=IDS).logits[..., :VOCAB]
    assert_logits_close(llama_logits(model, IDS)[..., :VOCAB], expected, FP32_RTOL)


def megahf_llama(tied: bool, seed: int):
    """A megahf Llama-style GPT of the tests' shape, its norms off 1 (so that a swapped norm cannot pass)."""
    config = megahf.MegatronGPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS,
                                      num_attention_heads=HEADS, num_query_groups=GROUPS, ffn_hidden_size=FFN,
                                      max_position_embeddings=POSITIONS, position_embedding_type="rope",
                                      normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                                      tie_word_embeddings=tied, layernorm_epsilon=1e-6)
    torch.manual_seed(seed)
    model = megahf.MegatronGPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _metadata(folder) -> dict:
    out = {}
    for path in sorted((folder / "model").rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path] = f.metadata() or {}
    return out


def test_a_damaged_shape_string_is_a_one_line_error_naming_the_file(nanotron, tmp_path):
    import shutil

    shutil.copytree(nanotron.runs["untied"].folder, tmp_path / "src")
    path = next((tmp_path / "src").rglob("qkv_proj/*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        data, meta = f.get_tensor("data"), f.metadata()
    save_file({"data": data}, path, metadata={**meta, "unsharded_shape": "(np.int64(12x8), 64)"})
    with pytest.raises(ConversionError, match=rf"{path}: unsharded_shape='\(np.int64\(12x8\), 64\)' in its metadata "
                                              "is not a shape") as error:
        read_checkpoint("nanotron", tmp_path / "src")
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------- TP=2 layout
# nanotron at TP=2 needs two processes; this folder is written from nanotron's rules instead (its source: serialize/
# weights.py `save_weights`, parallel/sharded_parameters.py: each contiguous chunk of a column-parallel weight split
# across ranks, the "local#global" slices string), from a transformers Llama, as examples/llama/
# convert_hf_to_nanotron.py interleaves it.


def llama(tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=FFN, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=GROUPS,
                                      max_position_embeddings=32, rope_theta=10000.0, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def interleave(w: torch.Tensor) -> torch.Tensor:
    """convert_hf_to_nanotron.py's interleave_weight: each head's halves layout -> adjacent pairs."""
    return torch.cat([h.view(2, HEAD_DIM // 2, -1).transpose(0, 1).reshape(HEAD_DIM, -1) for h in w.split(HEAD_DIM)])


def slices_text(pairs) -> str:
    def one(slices):
        return "|".join(",".join("None" if x is None else str(x) for x in (s.start, s.stop, s.step)) for s in slices)
    return ";".join(f"{one(local)}#{one(global_)}" for local, global_ in pairs)


def nanotron_folder(model, root, tp: int, rope_interleaved: bool):
    """Write `model` as nanotron's save_weights would at TP=`tp`, PP=1."""
    sd, c = model.state_dict(), model.config
    params: dict[str, tuple[torch.Tensor, str, tuple]] = {}  # name -> (tensor, split kind, contiguous chunks)
    params["model.token_position_embeddings.pp_block.token_embedding.weight"] = (sd["model.embed_tokens.weight"],
                                                                                "col", None)
    for i in range(c.num_hidden_layers):
        h, n = f"model.layers.{i}.", f"model.decoder.{i}.pp_block."
        q, k, v = (sd[h + f"self_attn.{p}_proj.weight"] for p in "qkv")
        if rope_interleaved:
            q, k = interleave(q), interleave(k)
        params[n + "attn.qkv_proj.weight"] = (torch.cat([q, k, v]), "col", (q.shape[0], k.shape[0], v.shape[0]))
        params[n + "attn.o_proj.weight"] = (sd[h + "self_attn.o_proj.weight"], "row", None)
        params[n + "mlp.gate_up_proj.weight"] = (torch.cat([sd[h + "mlp.gate_proj.weight"],
                                                            sd[h + "mlp.up_proj.weight"]]), "col", (FFN, FFN))
        params[n + "mlp.down_proj.weight"] = (sd[h + "mlp.down_proj.weight"], "row", None)
        params[n + "input_layernorm.weight"] = (sd[h + "input_layernorm.weight"], "rep", None)
        params[n + "post_attention_layernorm.weight"] = (sd[h + "post_attention_layernorm.weight"], "rep", None)
    params["model.final_layer_norm.pp_block.weight"] = (sd["model.norm.weight"], "rep", None)
    if not c.tie_word_embeddings:
        params["model.lm_head.pp_block.weight"] = (sd["lm_head.weight"], "col", None)
    for name, (tensor, kind, chunks) in params.items():
        parts = name.split(".")
        folder = root / "model" / "/".join(parts[:-1])
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "rep":
            save_file({"data": tensor.contiguous()}, folder / f"model_{parts[-1]}.safetensors")
            continue
        for rank in range(tp):
            pieces, pairs, local_start = [], [], 0
            if kind == "row":
                width = tensor.shape[1] // tp
                pieces.append(tensor[:, rank * width:(rank + 1) * width])
                pairs.append(((slice(0, tensor.shape[0]), slice(0, width)),
                              (slice(0, tensor.shape[0]), slice(rank * width, (rank + 1) * width))))
            else:
                global_start = 0
                for chunk in chunks or (tensor.shape[0],):  # each contiguous chunk split across ranks
                    rows = chunk // tp
                    begin = global_start + rank * rows
                    pieces.append(tensor[begin:begin + rows])
                    pairs.append(((slice(local_start, local_start + rows), slice(None)),
                                  (slice(begin, begin + rows), slice(None))))
                    local_start += rows
                    global_start += chunk
            data = torch.cat(pieces) if kind != "row" else pieces[0]
            metadata = {"version": "1.2", "local_global_slices_pairs": slices_text(pairs),
                        "unsharded_shape": str(tuple(tensor.shape))}
            save_file({"data": data.contiguous()}, folder / f"model_{parts[-1]}_pp-rank-0-of-1_tp-rank-{rank}-of-{tp}"
                      ".safetensors", metadata=metadata)
    config = {"bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
              "intermediate_size": FFN, "is_llama_config": True, "max_position_embeddings": 32,
              "num_attention_heads": HEADS, "num_hidden_layers": 2, "attention_bias": False,
              "num_key_value_heads": GROUPS, "pad_token_id": None, "pretraining_tp": 1, "rms_norm_eps": c.rms_norm_eps,
              "rope_scaling": None, "rope_theta": 10000.0, "rope_interleaved": rope_interleaved,
              "tie_word_embeddings": c.tie_word_embeddings, "use_cache": True, "vocab_size": 1024}
    (root / "model_config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("tp, interleaved, tied", [(2, True, True), (1, False, False)])
def test_a_sharded_or_halves_layout_checkpoint_gives_the_llamas_logits(tmp_path, tp, interleaved, tied):
    """TP=2 shards reassemble from their slices metadata; an explicit `rope_interleaved: false` (current nanotron's
    default, Llama 3's layout) is read as halves."""
    theirs = llama(tied)
    root = nanotron_folder(theirs, tmp_path / "nanotron", tp, interleaved)
    loaded = read_checkpoint("nanotron", root)
    assert loaded.layout["rope_interleaved"] == interleaved and loaded.notes == []
    with torch.no_grad():
        torch.testing.assert_close(build_model(loaded)(input_ids=IDS).logits, theirs(input_ids=IDS).logits,
                                   rtol=FP32_RTOL, atol=FP32_RTOL)


def test_missing_nanotron_shard_is_a_clear_error(tmp_path):
    root = nanotron_folder(llama(False), tmp_path / "nanotron", 2, False)
    next(root.rglob("model_weight_pp-rank-0-of-1_tp-rank-1-of-2.safetensors")).unlink()
    with pytest.raises(ConversionError, match="do not cover rows"):
        convert(root, tmp_path / "out", "nanotron", "megahf", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_writing_nanotron_sharded_is_refused_before_anything_is_written(tmp_path):
    """megahf writes nanotron checkpoints unsharded, as nanotron's own converter does: --tp/--pp name the fix."""
    root = nanotron_folder(llama(False), tmp_path / "nanotron", 1, False)
    convert(root, tmp_path / "megahf", "nanotron", "megahf", proof=False, show_progress=False)
    with pytest.raises(ConversionError, match=r"--tp 2 --pp 1: megahf writes nanotron checkpoints unsharded .*drop "
                                              r"--tp/--pp"):
        convert(tmp_path / "megahf", tmp_path / "out", "megahf", "nanotron", tp=2, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_rope_scaling_travels_through_a_nanotron_folder_as_nanotrons_converter_keeps_it(tmp_path):
    """Llama 3.1's kind of scaling (llama3, here over 16 positions): a transformers Llama folder -> megahf -> nanotron
    -> transformers. nanotron's config holds transformers' `rope_scaling` beside `rope_theta` (as nanotron's Hugging
    Face converter copies them), the proof notes that nanotron's own Llama computes it unscaled, and the Llama folder
    at the end gives the first one's logits, past the 16 positions too."""
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=1024, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=GROUPS, max_position_embeddings=64, rope_parameters=dict(rope))).eval()
    theirs.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "megahf", "hf-llama", "megahf", proof=False, show_progress=False)
    report = convert(tmp_path / "megahf", tmp_path / "nanotron", "megahf", "nanotron", show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"]
    assert any("nanotron's Llama keeps the field unused and computes unscaled RoPE" in n for n in report["notes"])
    written = json.loads((tmp_path / "nanotron" / "model_config.json").read_text())
    assert written["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
    assert written["rope_theta"] == 10000.0
    convert(tmp_path / "nanotron", tmp_path / "back", "nanotron", "hf-llama", show_progress=False)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert back.config.rope_parameters == theirs.config.rope_parameters
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        scale = expected.abs().max().item()
        torch.testing.assert_close(back(input_ids=ids).logits[..., :1024], expected, rtol=FP32_RTOL,
                                   atol=FP32_RTOL * scale)
