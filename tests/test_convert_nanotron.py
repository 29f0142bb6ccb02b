"""nanotron's Llama checkpoints <-> megahf. The `nanotron` package from PyPI (0.4) does not import here, so the oracle
is the layout exactly as nanotron's source writes it (github.com/huggingface/nanotron at commit 2411b022):
src/nanotron/serialize/weights.py `save_weights` (one safetensors file per parameter, tensor "data", sharded ones
with TensorMetadata), src/nanotron/serialize/utils.py `get_path` (the name's dots become folders, file
`model_weight[_pp-rank-P-of-N_tp-rank-T-of-M].safetensors`), src/nanotron/parallel/parameters.py `SlicesPair`
(the "local#global" slices string), src/nanotron/models/llama.py (qkv_proj with contiguous chunks (q, k, v),
gate_up_proj (gate, up), tied weights saved under the embedding's name), examples/llama/convert_hf_to_nanotron.py
(qkv = [q; k; v], the RoPE interleaving of q and k rows for rope_interleaved). Built here from a transformers Llama,
a nanotron checkpoint converts to megahf with the Llama's logits, also sharded TP=2 and interleaved, and a
round trip through nanotron is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from megahf.convert import convert, read_checkpoint
from megahf.convert.common import build_model

IDS = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(5))
TOL = dict(rtol=1e-5, atol=1e-5)  # same weights, float32, summation order only
HEADS, GROUPS, HEAD_DIM, FFN = 4, 2, 16, 96


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
            metadata = {"version": "1.5", "local_global_slices_pairs": slices_text(pairs),
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


@pytest.mark.parametrize("tp, interleaved, tied", [(1, False, False), (2, True, True)])
def test_nanotron_checkpoint_gives_the_llamas_logits_and_round_trips(tmp_path, tp, interleaved, tied):
    theirs = llama(tied)
    root = nanotron_folder(theirs, tmp_path / "nanotron", tp, interleaved)
    loaded = read_checkpoint("nanotron", root)
    assert loaded.layout["rope_interleaved"] == interleaved
    with torch.no_grad():
        torch.testing.assert_close(build_model(loaded)(input_ids=IDS).logits, theirs(input_ids=IDS).logits, **TOL)
    report = convert(root, tmp_path / "megahf", "nanotron", "megahf", show_progress=False)
    assert report["ok"] and report["round_trip"]["bitwise_equal"] and report["round_trip"]["format"] == "nanotron"
    back = convert(tmp_path / "megahf", tmp_path / "back", "megahf", "nanotron", show_progress=False)
    assert back["ok"]
    if not interleaved and tp == 1:  # megahf writes nanotron's own layout: every file is the one nanotron wrote
        for path in sorted((root / "model").rglob("*.safetensors")):
            from safetensors.torch import load_file
            written = load_file(tmp_path / "back" / path.relative_to(root))
            assert torch.equal(written["data"], load_file(path)["data"]), path


def test_missing_nanotron_shard_is_a_clear_error(tmp_path):
    root = nanotron_folder(llama(False), tmp_path / "nanotron", 2, False)
    next(root.rglob("model_weight_pp-rank-0-of-1_tp-rank-1-of-2.safetensors")).unlink()
    from megahf.convert import ConversionError
    with pytest.raises(ConversionError, match="do not cover rows"):
        convert(root, tmp_path / "out", "nanotron", "megahf", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_writing_nanotron_sharded_is_refused_before_anything_is_written(tmp_path):
    """megahf writes nanotron checkpoints unsharded, as nanotron's own converter does: --tp/--pp name the fix."""
    root = nanotron_folder(llama(False), tmp_path / "nanotron", 1, False)
    convert(root, tmp_path / "megahf", "nanotron", "megahf", proof=False, show_progress=False)
    from megahf.convert import ConversionError
    with pytest.raises(ConversionError, match=r"--tp 2 --pp 1: megahf writes nanotron checkpoints unsharded .*drop "
                                              r"--tp/--pp"):
        convert(tmp_path / "megahf", tmp_path / "out", "megahf", "nanotron", tp=2, show_progress=False)
    assert not (tmp_path / "out").exists()
