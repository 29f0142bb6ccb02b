"""MegatronGPTModel / MegatronGPTForCausalLM on tiny configs, single process, CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

import megahf  # noqa: F401  (registers the Auto classes)
from megahf import MegatronGPTConfig, MegatronGPTForCausalLM, MegatronGPTModel

VARIANTS = ["gpt", "llama"]
VOCAB = 50257
PADDED_VOCAB = 50304


def tiny_config(variant: str, **overrides) -> MegatronGPTConfig:
    common = dict(hidden_size=64, num_layers=2, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    if variant == "gpt":
        return MegatronGPTConfig.from_preset("gpt-tiny", **{**common, **overrides})
    return MegatronGPTConfig.from_preset(
        "llama-tiny", **{**common, "num_query_groups": 2, "ffn_hidden_size": 96, **overrides})


def tiny_model(variant: str, attn: str | None = None, seed: int = 0, **overrides) -> MegatronGPTForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(variant, **overrides)
    if attn is not None:
        config._attn_implementation = attn
    return MegatronGPTForCausalLM(config).eval()


def random_ids(batch: int, seq: int, seed: int = 1, high: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (batch, seq), generator=generator)


def left_padding_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------------------------------
# Names, shapes, tying


@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_core_names_and_shapes(variant):
    model = tiny_model(variant)
    config = model.config
    state = model.state_dict()
    h, heads, groups, d = 64, config.num_attention_heads, config.num_query_groups, config.head_dim
    assert state["model.embedding.word_embeddings.weight"].shape == (PADDED_VOCAB, h)
    assert state["output_layer.weight"].shape == (PADDED_VOCAB, h)
    assert state["model.decoder.final_layernorm.weight"].shape == (h,)
    for i in range(2):
        prefix = f"model.decoder.layers.{i}."
        assert state[prefix + "self_attention.linear_qkv.weight"].shape == ((heads + 2 * groups) * d, h)
        assert state[prefix + "self_attention.linear_proj.weight"].shape == (h, heads * d)
        assert state[prefix + "input_layernorm.weight"].shape == (h,)
        assert state[prefix + "pre_mlp_layernorm.weight"].shape == (h,)
        assert state[prefix + "mlp.linear_fc2.weight"].shape == (h, config.ffn_hidden_size)
    assert "model.decoder.layers.2.self_attention.linear_qkv.weight" not in state

    if variant == "gpt":
        assert groups == heads == 4
        assert state["model.decoder.layers.0.self_attention.linear_qkv.weight"].shape == (3 * h, h)
        assert state["model.embedding.position_embeddings.weight"].shape == (256, h)
        assert state["model.decoder.layers.0.mlp.linear_fc1.weight"].shape == (4 * h, h)
        for name in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
                     "input_layernorm", "pre_mlp_layernorm"):
            assert f"model.decoder.layers.0.{name}.bias" in state
        assert isinstance(model.model.decoder.final_layernorm, torch.nn.LayerNorm)
    else:
        assert (heads, groups) == (4, 2)
        assert state["model.decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 4) * 16, h)
        assert not any("position_embeddings" in k for k in state)
        assert not any(k.endswith(".bias") for k in state)
        assert state["model.decoder.layers.0.mlp.linear_fc1_gate.weight"].shape == (96, h)
        assert state["model.decoder.layers.0.mlp.linear_fc1_up.weight"].shape == (96, h)
        assert isinstance(model.model.decoder.final_layernorm, torch.nn.RMSNorm)
        assert not any(k.startswith("model.rotary_pos_emb") for k in state)  # inv_freq is not persistent


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_layer_tying(variant):
    model = tiny_model(variant)
    tied = model.output_layer.weight is model.model.embedding.word_embeddings.weight
    assert tied is (variant == "gpt")
    assert model.get_output_embeddings() is model.output_layer
    assert model.get_input_embeddings() is model.model.embedding.word_embeddings
    if variant == "llama":
        assert not torch.equal(model.output_layer.weight, model.model.embedding.word_embeddings.weight)


# --------------------------------------------------------------------------------------------------------------------
# Fused QKV layout


def pack_qkv(wq, wk, wv, heads, groups):
    """Megatron-Core's layout as the modeling docstring describes it: for each query group, its query heads, then
    its key, then its value, stacked along the output dimension."""
    d = wq.shape[0] // heads
    per_group = heads // groups
    rows = []
    for g in range(groups):
        rows += [wq[g * per_group * d:(g + 1) * per_group * d], wk[g * d:(g + 1) * d], wv[g * d:(g + 1) * d]]
    return torch.cat(rows)


def hand_rope(t: torch.Tensor, base: float) -> torch.Tensor:
    """Non-interleaved rotary embedding over the whole head, written out: positions 0..s-1, t is [b, heads, s, d]."""
    seq, d = t.shape[-2], t.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(t.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(t.dtype)
    first, second = t[..., : d // 2], t[..., d // 2:]
    return t * cos + torch.cat([-second, first], -1) * sin


def hand_attention(x, wq, bq, wk, bk, wv, bv, heads, groups, rope_base=None):
    """Causal multi-/grouped-query attention from separate Q, K, V matrices. Returns (output, probabilities)."""
    b, s, _ = x.shape
    d = wq.shape[0] // heads
    q = (x @ wq.T + bq).view(b, s, heads, d).transpose(1, 2)
    k = (x @ wk.T + bk).view(b, s, groups, d).transpose(1, 2)
    v = (x @ wv.T + bv).view(b, s, groups, d).transpose(1, 2)
    if rope_base is not None:
        q, k = hand_rope(q, rope_base), hand_rope(k, rope_base)
    group_of_head = torch.arange(heads) // (heads // groups)
    k, v = k[:, group_of_head], v[:, group_of_head]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(b, s, heads * d), probs


def additive_causal_mask(seq: int) -> torch.Tensor:
    return torch.zeros(seq, seq).masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))[None, None]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fused_qkv_layout_against_hand_attention(variant, attn):
    model = tiny_model(variant, attn=attn)
    config = model.config
    attention = model.model.decoder.layers[0].self_attention
    heads, groups, d, h = config.num_attention_heads, config.num_query_groups, config.head_dim, config.hidden_size
    generator = torch.Generator().manual_seed(3)
    wq, wk, wv = (torch.randn(n * d, h, generator=generator) * 0.2 for n in (heads, groups, groups))
    if config.add_bias_linear:
        bq, bk, bv = (torch.randn(n * d, generator=generator) * 0.2 for n in (heads, groups, groups))
    else:
        bq, bk, bv = torch.zeros(heads * d), torch.zeros(groups * d), torch.zeros(groups * d)
    with torch.no_grad():
        attention.linear_qkv.weight.copy_(pack_qkv(wq, wk, wv, heads, groups))
        if config.add_bias_linear:
            attention.linear_qkv.bias.copy_(pack_qkv(bq[:, None], bk[:, None], bv[:, None], heads, groups)[:, 0])
    x = torch.randn(2, 7, h, generator=generator)
    rope_base = config.rotary_base if config.position_embedding_type == "rope" else None
    expected, expected_probs = hand_attention(x, wq, bq, wk, bk, wv, bv, heads, groups, rope_base)

    rotary = None
    if rope_base is not None:
        rotary = model.model.rotary_pos_emb(x, torch.arange(7)[None])
    mask = additive_causal_mask(7) if attn == "eager" else None  # sdpa is causal by itself without a mask
    with torch.no_grad():
        output, probs = attention(x, mask, rotary)
    assert torch.allclose(output, attention.linear_proj(expected), atol=1e-5)
    if attn == "eager":  # per-head probabilities: each query head paired with its own group's key
        assert probs.shape == (2, heads, 7, 7)
        assert torch.allclose(probs, expected_probs, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_qkv_value_blocks_are_identifiable(variant):
    """Feed the same one-hot token everywhere and give each block of linear_qkv its own id: the output of every
    query head is then exactly the value block of its group."""
    model = tiny_model(variant, attn="eager")
    config = model.config
    attention = model.model.decoder.layers[0].self_attention
    heads, groups, d, h = config.num_attention_heads, config.num_query_groups, config.head_dim, config.hidden_size
    per_group = heads // groups
    ids = []
    for g in range(groups):
        ids += [10 * g + 1 + j for j in range(per_group)] + [10 * g + 8, 10 * g + 9]  # q heads, k, v of group g
    block_ids = torch.tensor(ids, dtype=torch.float).repeat_interleave(d)
    with torch.no_grad():
        attention.linear_qkv.weight.zero_()
        attention.linear_qkv.weight[:, 0] = block_ids * 0.01
        if attention.linear_qkv.bias is not None:
            attention.linear_qkv.bias.zero_()
        attention.linear_proj.weight.copy_(torch.eye(h))
        if attention.linear_proj.bias is not None:
            attention.linear_proj.bias.zero_()
    x = torch.zeros(1, 5, h)
    x[..., 0] = 100.0
    rotary = model.model.rotary_pos_emb(x, torch.arange(5)[None]) if model.model.rotary_pos_emb is not None else None
    with torch.no_grad():
        output, _ = attention(x, additive_causal_mask(5), rotary)
    for head in range(heads):
        group = head // per_group
        assert torch.allclose(output[..., head * d:(head + 1) * d], torch.full((1, 5, d), 10.0 * group + 9.0))


# --------------------------------------------------------------------------------------------------------------------
# Init


@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_init_statistics(variant):
    layers = 4
    torch.manual_seed(0)
    if variant == "gpt":
        config = MegatronGPTConfig.from_preset("gpt-tiny", hidden_size=256, num_layers=layers, num_attention_heads=4)
    else:
        config = MegatronGPTConfig.from_preset("llama-tiny", hidden_size=256, num_layers=layers,
                                               num_attention_heads=4, num_query_groups=2, ffn_hidden_size=512)
    model = MegatronGPTForCausalLM(config)
    std = 0.02
    scaled = std / math.sqrt(2 * layers)

    def check(tensor, expected_std):
        tensor = tensor.detach().float()
        assert abs(tensor.mean().item()) < 0.05 * expected_std
        assert tensor.std().item() == pytest.approx(expected_std, rel=0.03)

    check(model.model.embedding.word_embeddings.weight, std)
    check(model.output_layer.weight, std)
    if variant == "gpt":
        check(model.model.embedding.position_embeddings.weight, std)
    seen = set()
    for name, param in model.named_parameters():
        seen.add(name)
        if name.endswith("linear_qkv.weight") or ".linear_fc1" in name and name.endswith("weight"):
            check(param, std)
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            check(param, scaled)
        elif name.endswith(".bias") and ".linear_" in name:
            assert torch.count_nonzero(param) == 0, name
        elif "layernorm" in name:
            if name.endswith(".weight"):
                assert torch.equal(param, torch.ones_like(param)), name
            else:
                assert torch.count_nonzero(param) == 0, name
        else:
            assert name in {"model.embedding.word_embeddings.weight", "output_layer.weight",
                            "model.embedding.position_embeddings.weight"}, name
    assert any("linear_fc2" in n for n in seen) and any("linear_proj" in n for n in seen)
    if variant == "llama":
        inv_freq = model.model.rotary_pos_emb.inv_freq
        d = config.head_dim
        assert torch.allclose(inv_freq, 1.0 / (config.rotary_base ** (torch.arange(0, d, 2).float() / d)))


# --------------------------------------------------------------------------------------------------------------------
# Logits, padded vocabulary, loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_cover_the_real_vocabulary_only(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 6)
    out = model(ids)
    assert model.config.padded_vocab_size == PADDED_VOCAB
    assert out.logits.shape == (2, 6, VOCAB)
    assert model.output_layer.out_features == PADDED_VOCAB
    # They are the first vocab_size columns of the full output layer.
    hidden = model.model(ids).last_hidden_state
    assert torch.allclose(out.logits, (hidden @ model.output_layer.weight.T)[..., :VOCAB], atol=1e-5)
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, VOCAB)
    assert torch.allclose(last[:, 0], out.logits[:, -1], atol=1e-5)


def make_padded_rows_dominate(model):
    """Give the padded rows of the output layer weights that make them the argmax at every position."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        padded = model.output_layer.weight[VOCAB:]
        padded.copy_(torch.randn(padded.shape, generator=generator))


def full_logits_recorder(model):
    seen = []
    handle = model.output_layer.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    return seen, handle


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sample", [False, True])
def test_padded_rows_are_never_generated(variant, sample):
    model = tiny_model(variant)
    make_padded_rows_dominate(model)
    ids = random_ids(2, 4)
    seen, handle = full_logits_recorder(model)
    torch.manual_seed(0)
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=sample,
                             top_k=0 if sample else None, pad_token_id=0)
    finally:
        handle.remove()
    assert seen and all(full.shape[-1] == PADDED_VOCAB for full in seen)
    # The padded columns would win at every step ...
    assert all(bool((full[:, -1].argmax(-1) >= VOCAB).all()) for full in seen)
    # ... but are never generated.
    assert out.shape == (2, 10)
    assert int(out.max()) < VOCAB


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("padded_vocab_softmax", [False, True])
def test_loss_is_shifted_cross_entropy_of_the_returned_logits(variant, padded_vocab_softmax):
    """By default the loss is the cross entropy of the logits the model returns (real vocabulary only), so that
    scores computed from the logits agree with the loss; `padded_vocab_softmax=True` is Megatron-LM's training loss,
    whose softmax also covers the padded rows."""
    model = tiny_model(variant, padded_vocab_softmax=padded_vocab_softmax)
    make_padded_rows_dominate(model)  # makes the padded and the unpadded softmax differ a lot
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[0, 3] = -100
    labels[1, :4] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape[-1] == VOCAB

    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
    full = hidden @ model.output_layer.weight.T  # [b, s, padded vocab]
    assert full.shape[-1] == PADDED_VOCAB
    targets = labels[:, 1:].reshape(-1)
    assert int((targets != -100).sum()) == 16 - 1 - 3
    of_returned_logits = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), targets, ignore_index=-100)
    over_padded = F.cross_entropy(full[:, :-1].reshape(-1, PADDED_VOCAB), targets, ignore_index=-100)
    assert abs(of_returned_logits.item() - over_padded.item()) > 1.0  # the two losses really differ here
    expected = over_padded if padded_vocab_softmax else of_returned_logits
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_last_label_and_ignored_positions_do_not_count(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 8)
    labels = ids.clone()
    base = model(ids, labels=labels).loss
    # Position 0's label is never a target (nothing precedes it).
    first_changed = labels.clone()
    first_changed[:, 0] = 11
    assert torch.allclose(model(ids, labels=first_changed).loss, base)
    # All but one target ignored: the loss is that one token's cross entropy.
    only = torch.full_like(labels, -100)
    only[1, 5] = labels[1, 5]
    logits = (model.model(ids).last_hidden_state @ model.output_layer.weight.T)[..., :VOCAB]
    expected = -logits[1, 4].log_softmax(-1)[labels[1, 5]]
    assert torch.allclose(model(ids, labels=only).loss, expected, atol=1e-5)


def test_num_items_in_batch_is_the_denominator():
    model = tiny_model("gpt")
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    mean = model(ids, labels=labels).loss  # 2 x 7 targets, 2 of them ignored (labels[0, 0] is no target)
    total = model(ids, labels=labels, num_items_in_batch=torch.tensor(24)).loss
    assert torch.allclose(total, mean * 12 / 24, rtol=1e-6)
    assert torch.allclose(model(ids, labels=labels, num_items_in_batch=12).loss, mean, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shift_labels_equal_unshifted_labels(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[0, 2] = -100
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    by_labels = model(ids, labels=labels).loss
    by_shift = model(ids, shift_labels=shift_labels).loss
    assert by_shift is not None
    assert torch.allclose(by_labels, by_shift, atol=1e-6)
    # Gradients agree too.
    model.zero_grad()
    model(ids, labels=labels).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids, shift_labels=shift_labels).loss.backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, grads[name], atol=1e-7), name


# --------------------------------------------------------------------------------------------------------------------
# Attention: implementations, causality, padding


@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_and_sdpa_agree(variant):
    eager = tiny_model(variant, attn="eager")
    sdpa = tiny_model(variant, attn="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    sdpa.load_state_dict(eager.state_dict())
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    position_ids = left_padding_position_ids(mask)
    for kwargs in ({}, {"attention_mask": mask, "position_ids": position_ids}):
        a, b = eager(ids, **kwargs).logits, sdpa(ids, **kwargs).logits
        real = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)
        assert torch.allclose(a[real], b[real], atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_causal_mask(variant, attn):
    model = tiny_model(variant, attn=attn)
    ids = random_ids(2, 10)
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 1) % VOCAB
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padding_matches_unpadded_rows(variant, attn):
    model = tiny_model(variant, attn=attn)
    long, short = random_ids(1, 8, seed=2), random_ids(1, 5, seed=3)
    pad = 0
    batch = torch.cat([long, torch.cat([torch.full((1, 3), pad), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    position_ids = left_padding_position_ids(mask)
    out = model(batch, attention_mask=mask, position_ids=position_ids).logits
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], model(long).logits[0], atol=1e-5)
    assert torch.allclose(out[1, 3:], model(short).logits[0], atol=1e-5)
    # The pad tokens' ids do not matter.
    other = batch.clone()
    other[1, :3] = 123
    assert torch.allclose(model(other, attention_mask=mask, position_ids=position_ids).logits[1, 3:],
                          out[1, 3:], atol=1e-6)


def test_learned_positions_need_position_ids_under_left_padding():
    """Without position ids the model counts from 0 at the first (pad) slot: with learned absolute positions the
    real tokens then get shifted positions. generate passes position ids from the attention mask (next test)."""
    model = tiny_model("gpt")
    short = random_ids(1, 5, seed=3)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    shifted = model(padded, attention_mask=mask).logits[0, 3:]
    assert not torch.allclose(shifted, model(short).logits[0], atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_passes_position_ids_from_the_attention_mask(variant):
    model = tiny_model(variant)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("position_ids")),
                                    with_kwargs=True)
    batch = torch.cat([random_ids(1, 6, seed=2), torch.cat([torch.zeros(1, 2, dtype=torch.long),
                                                           random_ids(1, 4, seed=3)], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    model.generate(batch, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert seen[0] is not None
    assert seen[0].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    assert seen[1].tolist() == [[6], [4]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_left_padded_generate_equals_unbatched(variant):
    model = tiny_model(variant)
    prompts = [random_ids(1, 7, seed=2), random_ids(1, 4, seed=3), random_ids(1, 1, seed=4)]
    width = max(p.shape[1] for p in prompts)
    pad = 0
    batch = torch.cat([F.pad(p, (width - p.shape[1], 0), value=pad) for p in prompts])
    mask = torch.cat([F.pad(torch.ones_like(p), (width - p.shape[1], 0), value=0) for p in prompts])
    new = 6
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad,
                             eos_token_id=None)
    assert batched.shape == (3, width + new)
    for row, prompt in enumerate(prompts):
        single = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                                pad_token_id=pad, eos_token_id=None)
        assert torch.equal(batched[row, width:], single[0, prompt.shape[1]:]), row


# --------------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_and_without_cache_agree(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 5)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_static_cache(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 5)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), model.generate(ids, **kwargs))


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_logits_equal_full_forward(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 10)
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    cache = out.cache
    assert cache is not None and cache.get_seq_length() == 5
    assert torch.allclose(out.logits, full[:, :5], atol=1e-5)
    # Two tokens at once, then one at a time.
    out = model(ids[:, 5:7], cache=cache, use_cache=True)
    assert torch.allclose(out.logits, full[:, 5:7], atol=1e-5)
    for t in range(7, 10):
        out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
        assert torch.allclose(out.logits[:, 0], full[:, t], atol=1e-5), t
    assert out.cache.get_seq_length() == 10
    # No cache is returned unless asked for.
    assert model(ids, use_cache=False).cache is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_logits_with_left_padding(variant):
    model = tiny_model(variant)
    batch = torch.cat([random_ids(1, 6, seed=2), F.pad(random_ids(1, 4, seed=3), (2, 0), value=0)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    nxt = random_ids(2, 1, seed=9)
    full_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    full = model(torch.cat([batch, nxt], 1), attention_mask=full_mask,
                 position_ids=left_padding_position_ids(full_mask)).logits
    out = model(batch, attention_mask=mask, position_ids=left_padding_position_ids(mask), use_cache=True)
    step = model(nxt, attention_mask=full_mask, position_ids=left_padding_position_ids(full_mask)[:, -1:],
                 cache=out.cache, use_cache=True)
    assert torch.allclose(step.logits[:, 0], full[:, -1], atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Training mechanics


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_gives_same_loss_and_grads(variant):
    model = tiny_model(variant).train()
    ids = random_ids(2, 8)
    qkv_calls = []  # a pre-hook: torch's checkpoint stops recomputing once it has every saved tensor it needs
    model.model.decoder.layers[0].self_attention.linear_qkv.register_forward_pre_hook(lambda *_: qkv_calls.append(1))

    def loss_and_grads(**kwargs):
        model.zero_grad()
        qkv_calls.clear()
        loss = model(ids, labels=ids, **kwargs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_off, grads_off = loss_and_grads()
    assert len(qkv_calls) == 1
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.model.decoder.layers)
    loss_on, grads_on = loss_and_grads()
    assert len(qkv_calls) == 2  # the backward pass recomputed the layer
    assert torch.allclose(loss_on, loss_off, atol=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_off:
        assert torch.allclose(grads_on[name], grads_off[name], atol=1e-6), name
    assert all(g.abs().sum() > 0 for n, g in grads_on.items() if "word_embeddings" in n or "linear_qkv" in n)

    # A cache passed while training with checkpointing is left alone (not updated again by the backward replay).
    cache = DynamicCache(config=model.config)
    loss_cached, grads_cached = loss_and_grads(cache=cache, use_cache=True)
    assert cache.get_seq_length() == 0
    assert torch.allclose(loss_cached, loss_off, atol=1e-6)
    for name in grads_off:
        assert torch.allclose(grads_cached[name], grads_off[name], atol=1e-6), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_hidden_states(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 6)
    out = model(ids, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == model.config.num_layers + 1 == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 6, 64) for h in hidden)
    # The first is the embedding output, the last the final-norm output.
    position_ids = torch.arange(6)[None]
    assert torch.allclose(hidden[0], model.model.embedding(ids, position_ids), atol=1e-6)
    base = model.model(ids)
    assert torch.allclose(hidden[-1], base.last_hidden_state, atol=1e-6)
    # hidden_states[1] is the first layer's output (a causal layer: sdpa without a mask is causal).
    rotary = model.model.rotary_pos_emb(hidden[0], position_ids) if model.model.rotary_pos_emb is not None else None
    layer0 = model.model.decoder.layers[0](hidden[0], attention_mask=None, position_embeddings=rotary)
    assert torch.allclose(hidden[1], layer0, atol=1e-5)
    assert not torch.allclose(hidden[1], hidden[0])
    assert model(ids).hidden_states is None
    # The config flag works too.
    model.config.output_hidden_states = True
    assert len(model(ids).hidden_states) == 3


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_attentions_eager(variant):
    model = tiny_model(variant, attn="eager")
    ids = random_ids(2, 6)
    out = model(ids, output_attentions=True)
    attentions = out.attentions
    assert len(attentions) == model.config.num_layers
    for probs in attentions:
        assert probs.shape == (2, model.config.num_attention_heads, 6, 6)
        assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 6), atol=1e-5)
        assert torch.count_nonzero(probs.triu(1)) == 0  # causal
    assert model(ids).attentions is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_inputs_embeds_equal_input_ids(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 6)
    embeds = model.model.embedding.word_embeddings(ids)
    assert torch.allclose(model(inputs_embeds=embeds).logits, model(ids).logits, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one"):
        model()


# --------------------------------------------------------------------------------------------------------------------
# Save / load, Auto classes, pipeline, export


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_auto_load(variant, tmp_path):
    model = tiny_model(variant)
    model.save_pretrained(tmp_path)
    ids = random_ids(2, 6)

    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is MegatronGPTConfig
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is MegatronGPTForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded.eval()
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    tied = loaded.output_layer.weight is loaded.model.embedding.word_embeddings.weight
    assert tied is (variant == "gpt")

    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is MegatronGPTModel
    assert torch.allclose(base(ids).last_hidden_state, model.model(ids).last_hidden_state, atol=1e-6)


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from megahf.assets import load_gpt2_tokenizer

    tokenizer = load_gpt2_tokenizer()
    assert len(tokenizer) == VOCAB
    # Decoder-only batches are left-padded; GPT-2 has no pad token of its own.
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_generation_pipeline(variant, gpt2_tokenizer):
    from transformers import pipeline

    model = tiny_model(variant)
    generator = pipeline("text-generation", model=model, tokenizer=gpt2_tokenizer)
    result = generator("Hello world", max_new_tokens=5, do_sample=False)
    text = result[0]["generated_text"]
    assert text.startswith("Hello world")
    prompt = gpt2_tokenizer("Hello world", return_tensors="pt").input_ids
    assert prompt.tolist() == [[15496, 995]]
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert text == gpt2_tokenizer.decode(expected[0])
    # Batched prompts of different lengths, left-padded.
    batch = generator(["Hello world", "To be or not to be"], max_new_tokens=3, do_sample=False, batch_size=2)
    assert batch[0][0]["generated_text"] == generator("Hello world", max_new_tokens=3,
                                                       do_sample=False)[0]["generated_text"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_export_without_cache(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 6)
    program = torch.export.export(model, args=(), kwargs={"input_ids": ids, "use_cache": False}, strict=False)
    exported = program.module()(input_ids=ids, use_cache=False)
    logits = exported["logits"] if isinstance(exported, dict) else exported.logits
    assert torch.allclose(logits, model(ids, use_cache=False).logits, atol=1e-5)
    other = random_ids(2, 6, seed=7)
    again = program.module()(input_ids=other, use_cache=False)
    again = again["logits"] if isinstance(again, dict) else again.logits
    assert torch.allclose(again, model(other, use_cache=False).logits, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# It learns; dropout


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_trains(variant):
    model = tiny_model(variant).train()
    ids = random_ids(2, 16, high=500)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert losses[0] > 10.0  # about ln(50304) at init
    assert losses[-1] < 0.25 * losses[0], losses
    if variant == "gpt":  # tied: one tensor, trained through both uses
        assert model.output_layer.weight is model.model.embedding.word_embeddings.weight


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_train_vs_eval(variant):
    model = tiny_model(variant, hidden_dropout=0.1, attention_dropout=0.1)
    ids = random_ids(2, 8)
    model.train()
    torch.manual_seed(0)
    a = model(ids).logits
    b = model(ids).logits
    assert not torch.allclose(a, b)
    torch.manual_seed(0)
    assert torch.equal(model(ids).logits, a)  # same seed, same masks
    model.eval()
    c, d = model(ids).logits, model(ids).logits
    assert torch.equal(c, d)
    no_dropout = tiny_model(variant)
    no_dropout.load_state_dict(model.state_dict())
    assert torch.allclose(c, no_dropout(ids).logits, atol=1e-6)
