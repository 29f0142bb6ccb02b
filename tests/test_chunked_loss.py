"""The chunked output layer + cross entropy (`loss_chunk_size`) against the plain output layer and loss: the same
loss and gradients on random inputs (with and without the output bias) and inside the GPT and BERT models, and the
`[tokens, vocabulary]` logits never exist.

Tolerance: in float32 the two paths compute the same sums in different orders (the weight's gradient sums over the
tokens chunk by chunk; the softmax is exp / sum instead of log_softmax). Each float32 operation rounds by at most
2^-24 = 6e-8 relative, and a sum of n terms in any order differs by at most ~n * 6e-8 of the sum of the terms'
magnitudes (much less in practice: ~sqrt(n)); with the <= 64 tokens and 128 vocabulary rows here that is <= ~1e-6
of the largest element, the issue's bound. A wrong chunk boundary, a missed ignore_index or a wrong denominator
changes whole elements (errors of 1e-2 and more)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megahf import MegatronBertConfig, MegatronGPTConfig, MegatronGPTForCausalLM
from megahf.models.chunked_loss import chunked_causal_lm_loss, chunked_masked_lm_loss, linear_cross_entropy_sum
from megahf.models.padded_vocab import causal_lm_loss, masked_lm_loss

TOLERANCE = 1e-6
VOCAB, PADDED, HIDDEN = 99, 128, 16  # 29 padded rows


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.detach() - expected.detach()).abs().max() / expected.detach().abs().max()).item()


def inputs(batch=3, seq=11, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, HIDDEN, generator=generator, dtype=dtype).requires_grad_()
    layer = torch.nn.Linear(HIDDEN, PADDED, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(PADDED, HIDDEN, generator=generator))
    labels = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    labels[0, 2:6] = -100  # ignored positions
    labels[1, -3:] = -100  # right padding
    return hidden, layer, labels


def loss_and_grads(loss_fn, hidden, layer, labels, **kwargs):
    hidden.grad = layer.weight.grad = None
    loss = loss_fn(hidden, layer, labels, vocab_size=VOCAB, **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad.clone(), layer.weight.grad.clone()


def plain(hidden, layer, labels, **kwargs):
    kwargs.pop("chunk_size", None)
    return causal_lm_loss(layer(hidden), labels, **kwargs)


@pytest.mark.parametrize("chunk_size", [1, 7, 33, 1000])  # 33 tokens: chunks of 1, a non-divisor, all, more than all
@pytest.mark.parametrize("padded_vocab_softmax", [False, True])
@pytest.mark.parametrize("num_items_in_batch", [None, 21, "tensor"])
def test_equals_the_plain_loss_and_gradients(chunk_size, padded_vocab_softmax, num_items_in_batch):
    hidden, layer, labels = inputs()
    if num_items_in_batch == "tensor":
        num_items_in_batch = torch.tensor(40)
    kwargs = dict(padded_vocab_softmax=padded_vocab_softmax, num_items_in_batch=num_items_in_batch)
    expected = loss_and_grads(plain, hidden, layer, labels, **kwargs)
    actual = loss_and_grads(chunked_causal_lm_loss, hidden, layer, labels, chunk_size=chunk_size, **kwargs)
    for name, a, e in zip(("loss", "grad hidden", "grad weight"), actual, expected):
        assert rel_err(a, e) <= TOLERANCE, f"{name}: {rel_err(a, e)}"
    padded_rows = actual[2][VOCAB:]
    assert padded_rows.abs().max().item() == 0.0 if not padded_vocab_softmax else padded_rows.abs().max() > 0


@pytest.mark.parametrize("head", ["causal", "masked-lm with bias"])
def test_a_target_probability_below_float32s_range_still_gives_the_exact_loss(head):
    """On one process the loss is -log p(target) from torch's softmax; where p(target) is below float32's smallest
    normal number (1.2e-38: a loss above 87.3) that logarithm would be inexact or infinite, and the row's loss is
    recomputed from its logits (with the bias, for BERT's head). Hidden states 30x larger spread the logits over
    hundreds, so that many targets fall there (asserted); the plain loss (log_softmax: exact at any distance) must
    still be matched to the same bound as above, relative to the largest element."""
    hidden, layer, labels = inputs()
    with torch.no_grad():
        hidden *= 30
    if head == "causal":
        targets = labels[:, 1:]
        plain_fn, chunked_fn = plain, chunked_causal_lm_loss
    else:
        targets = labels
        layer = torch.nn.Linear(HIDDEN, PADDED)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(PADDED, HIDDEN, generator=torch.Generator().manual_seed(1)))
            layer.bias.copy_(torch.randn(PADDED, generator=torch.Generator().manual_seed(2)) * 30)
        plain_fn = lambda h, m, y, **kw: masked_lm_loss(m(h), y, **kw)  # noqa: E731
        chunked_fn = lambda h, m, y, **kw: chunked_masked_lm_loss(h.reshape(-1, HIDDEN), m, y, **kw)  # noqa: E731
    logits = layer(hidden)[:, : targets.shape[1], :VOCAB]
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
    assert (per_token > 87.4).sum() >= 5, "the inputs must put several targets below float32's normal range"
    expected = loss_and_grads(plain_fn, hidden, layer, labels)
    actual = loss_and_grads(chunked_fn, hidden, layer, labels, chunk_size=7)
    assert torch.isfinite(actual[0])
    for name, a, e in zip(("loss", "grad hidden", "grad weight"), actual, expected):
        assert rel_err(a, e) <= TOLERANCE, f"{name}: {rel_err(a, e)}"


def test_shift_labels_equal_labels_shifted():
    hidden, layer, labels = inputs()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    expected = loss_and_grads(plain, hidden, layer, labels)
    actual = loss_and_grads(lambda h, m, _, **kw: chunked_causal_lm_loss(h, m, None, shift_labels=shifted, **kw),
                            hidden, layer, labels, chunk_size=5)
    for a, e in zip(actual, expected):
        assert rel_err(a, e) <= TOLERANCE


@pytest.mark.parametrize("tokens", [0, 5])
def test_no_kept_token_gives_a_zero_sum_and_zero_gradients(tokens):
    """No token at all, or every label ignored: the summed loss and both gradients are exactly zero (the weight's
    gradient is written by the first chunk, not pre-zeroed: with no chunk it must still come back zeroed)."""
    hidden = torch.randn(tokens, HIDDEN, requires_grad=True)
    weight = torch.randn(PADDED, HIDDEN, requires_grad=True)
    total = linear_cross_entropy_sum(hidden, weight, torch.full((tokens,), -100), 2, columns=VOCAB)
    total.backward()
    assert total.item() == 0.0
    assert hidden.grad.abs().sum().item() == 0.0 and weight.grad.abs().sum().item() == 0.0


def test_out_of_range_label_is_refused_and_bad_chunk_size():
    hidden, layer, labels = inputs()
    labels[2, 3] = VOCAB  # a padded row: no token (position 0 is never a target after the shift)
    with pytest.raises(IndexError, match=f"label {VOCAB} is out of range for a loss over {VOCAB} classes"):
        chunked_causal_lm_loss(hidden, layer, labels, vocab_size=VOCAB, chunk_size=4)
    with pytest.raises(ValueError, match="loss_chunk_size=0"):
        linear_cross_entropy_sum(hidden, layer.weight, labels.reshape(-1), 0)
    with pytest.raises(ValueError, match="loss_chunk_size=-1"):
        MegatronGPTConfig.from_preset("gpt-tiny", loss_chunk_size=-1)


def test_bf16_autocast_matches_the_plain_loss():
    """Under bf16 autocast both paths run the output layer's matmuls in bf16 and the softmax in float32. bf16 keeps 8
    significant bits (relative rounding 2^-9 = 2e-3 per element), and the plain path rounds its weight gradient to
    bf16 once more: the two agree to ~1e-2 of the largest element, and a wrong path would be off by O(1)."""
    hidden, layer, labels = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(plain, hidden, layer, labels)
        actual = loss_and_grads(chunked_causal_lm_loss, hidden, layer, labels, chunk_size=7)
    assert layer.weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    for name, a, e in zip(("loss", "grad hidden", "grad weight"), actual, expected):
        assert rel_err(a, e) <= 2e-2, f"{name}: {rel_err(a, e)}"


@pytest.mark.parametrize("padded_vocab_softmax", [False, True])
@pytest.mark.parametrize("num_items_in_batch", [None, 21])
def test_with_a_bias_equals_the_plain_masked_lm_loss(padded_vocab_softmax, num_items_in_batch):
    """BERT's output layer has a bias: the chunk loop adds it and returns its gradient (the logits' gradient summed
    over the tokens); the same bound as above."""
    hidden, _, labels = inputs()
    generator = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(HIDDEN, PADDED)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(PADDED, HIDDEN, generator=generator))
        layer.bias.copy_(torch.randn(PADDED, generator=generator))
    kwargs = dict(vocab_size=VOCAB, padded_vocab_softmax=padded_vocab_softmax, num_items_in_batch=num_items_in_batch)
    results = []
    for loss_fn in (lambda h: masked_lm_loss(layer(h), labels, **kwargs),
                    lambda h: chunked_masked_lm_loss(h.reshape(-1, HIDDEN), layer, labels, chunk_size=7, **kwargs)):
        hidden.grad = layer.weight.grad = layer.bias.grad = None
        loss = loss_fn(hidden)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()))
    for name, e, a in zip(("loss", "grad hidden", "grad weight", "grad bias"), *results):
        assert rel_err(a, e) <= TOLERANCE, f"{name}: {rel_err(a, e)}"


# ---- inside the model


def assert_same_gradients(model, loss, reference, reference_loss) -> None:
    """Back-propagate both losses; every parameter's gradient within TOLERANCE of the reference model's largest
    gradient element (the scale of what is compared), and absent where the reference's is."""
    reference_loss.backward()
    loss.backward()
    grads = dict(reference.named_parameters())
    scale = max(p.grad.abs().max() for p in grads.values() if p.grad is not None)
    for name, param in model.named_parameters():
        if grads[name].grad is None:
            assert param.grad is None, name
            continue
        assert ((param.grad - grads[name].grad).abs().max() / scale).item() <= TOLERANCE, name


def tiny(variant: str, chunk: int, seed: int = 0, vocab: int = VOCAB) -> MegatronGPTForCausalLM:
    torch.manual_seed(seed)
    preset = "gpt-tiny" if variant == "gpt" else "llama-tiny"
    shape = dict(vocab_size=vocab, hidden_size=32, num_layers=2, num_attention_heads=4, hidden_dropout=0.0,
                 attention_dropout=0.0, loss_chunk_size=chunk)
    if variant == "llama":
        shape.update(num_query_groups=2, ffn_hidden_size=64, tie_word_embeddings=False)
    return MegatronGPTForCausalLM(MegatronGPTConfig.from_preset(preset, **shape))


@pytest.mark.parametrize("variant", ["gpt", "llama"])
def test_model_training_loss_and_every_gradient_equal_the_plain_model(variant):
    plain_model, chunked_model = tiny(variant, 0), tiny(variant, 5)
    chunked_model.load_state_dict(plain_model.state_dict())
    _, _, labels = inputs(2, 9, seed=3)
    batch = {"input_ids": labels.clamp_min(0), "labels": labels}
    plain_model.train(), chunked_model.train()
    expected, actual = plain_model(**batch), chunked_model(**batch)
    assert actual.logits is None and expected.logits is not None  # training with labels: no logits
    assert rel_err(actual.loss, expected.loss) <= TOLERANCE
    assert_same_gradients(chunked_model, actual.loss, plain_model, expected.loss)
    # eval mode (evaluation, generation) and a forward without labels return logits as always
    chunked_model.eval()
    with torch.no_grad():
        out = chunked_model(**batch)
        assert out.logits.shape[-1] == VOCAB and rel_err(out.loss, expected.loss) <= TOLERANCE
    chunked_model.train()
    assert chunked_model(input_ids=batch["input_ids"]).logits is not None


def _plain_model_and_batch(variant: str):
    """A model with `loss_chunk_size: 0` and a training batch: GPT, Llama, or BERT's masked LM (output bias)."""
    _, _, labels = inputs(2, 9, seed=4)
    if variant != "bert":
        return tiny(variant, 0), {"input_ids": labels.clamp_min(0), "labels": labels}
    import megahf.models.bert.modeling_megatron_bert as bert

    torch.manual_seed(0)
    config = MegatronBertConfig.from_preset("bert-tiny", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                                            num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    return bert.MegatronBertForMaskedLM(config), {"input_ids": labels.clamp_min(0), "labels": labels}


@pytest.mark.parametrize("variant", ["gpt", "llama", "bert"])
def test_plain_training_multiplies_only_the_real_vocabulary_rows(variant, monkeypatch):
    """With `loss_chunk_size: 0` a training forward with labels multiplies the output layer's first `vocab_size`
    rows only (`output_logits`; BERT with its bias's first `vocab_size` entries): the same logits, loss and every
    gradient as calling the whole padded layer and slicing (forced here by a forward hook on the output layer, which
    must then run: a hooked layer is called)."""
    direct, batch = _plain_model_and_batch(variant)
    called, _ = _plain_model_and_batch(variant)
    called.load_state_dict(direct.state_dict())
    hook_calls = []
    called.output_layer.register_forward_hook(lambda module, args, out: hook_calls.append(out.shape[-1]))
    direct.train(), called.train()
    expected = called(**batch)
    rows = []  # the row counts of every linear layer's weight in the direct model's forward
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: rows.append(w.shape[0]) or linear(x, w, b))
    actual = direct(**batch)
    monkeypatch.undo()
    assert rows[-1] == VOCAB  # the output layer, last: its real rows only
    assert hook_calls == [PADDED] and actual.logits.shape[-1] == VOCAB
    assert rel_err(actual.logits, expected.logits) <= TOLERANCE and rel_err(actual.loss, expected.loss) <= TOLERANCE
    assert_same_gradients(direct, actual.loss, called, expected.loss)


@pytest.mark.parametrize("head", ["MegatronBertForPreTraining", "MegatronBertForMaskedLM"])
def test_bert_head_on_the_labeled_positions_gives_the_same_loss_and_every_gradient(head):
    """BERT with loss_chunk_size: in training with labels the masked-LM head runs on the labeled positions only
    (about 15%) and returns no masked-LM logits. The head is per position, so every loss and gradient equals the
    plain model's: the other positions' logits get a zero gradient there, which sums to exact zeros. Only the order
    of float32 sums changes (the weight gradients sum over fewer rows, in other blocks): bounded as above, with the
    model's gradient scale as the reference."""
    import megahf.models.bert.modeling_megatron_bert as bert

    torch.manual_seed(0)
    config = MegatronBertConfig.from_preset("bert-tiny", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                                            num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    plain_model = getattr(bert, head)(config).train()
    chunked_model = getattr(bert, head)(MegatronBertConfig.from_dict({**config.to_dict(), "loss_chunk_size": 5}))
    chunked_model.load_state_dict(plain_model.state_dict())
    chunked_model.train()
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.3
    labels[picked] = ids[picked]
    batch = {"input_ids": ids, "labels": labels}
    if head == "MegatronBertForPreTraining":
        batch["next_sentence_label"] = torch.tensor([0, 1, 0])
    expected, actual = plain_model(**batch), chunked_model(**batch)
    logits = "prediction_logits" if head == "MegatronBertForPreTraining" else "logits"
    assert getattr(actual, logits) is None and getattr(expected, logits) is not None
    assert rel_err(actual.loss, expected.loss) <= TOLERANCE
    assert_same_gradients(chunked_model, actual.loss, plain_model, expected.loss)
    chunked_model.eval()  # evaluation and the fill-mask sample: logits at every position, as always
    with torch.no_grad():
        out = chunked_model(**batch)
    assert getattr(out, logits).shape[:2] == ids.shape and rel_err(out.loss, expected.loss) <= TOLERANCE


class _LargestTensor(TorchDispatchMode):
    """The largest tensor (elements) that any op creates, forward and backward (no timing, no allocator)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def _saved_numels(model, batch) -> tuple[int, list[int]]:
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        loss = model(**batch).loss
    return loss, sizes


@pytest.mark.parametrize("variant", ["gpt", "llama"])
def test_the_logits_never_exist_whole(variant):
    """Counted, not timed: no tensor of [tokens, vocabulary] elements is created in the forward or the backward pass,
    and nothing of that size is saved for backward; the plain path creates and saves several."""
    batch_size, seq, chunk, vocab = 4, 16, 8, 1000  # 1024 rows: the logits outweigh every activation (64 x 128)
    ids = torch.randint(0, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    logits_numel = batch_size * seq * vocab  # the real-vocabulary logits; the padded ones are larger still
    results = {}
    for name, chunk_size in (("plain", 0), ("chunked", chunk)):
        model = tiny(variant, chunk_size, vocab=vocab).train()
        with _LargestTensor() as mode:
            loss, saved = _saved_numels(model, batch)
            loss.backward()
        results[name] = (mode.largest, max(saved), mode.op)
    assert results["plain"][0] >= logits_numel and results["plain"][1] >= logits_numel  # the measure can fail
    largest, saved_largest, op = results["chunked"]
    # the weight (1024 x 32) and its gradient are now the largest tensors; a chunk's logits are 8 x 1024
    assert largest < logits_numel and saved_largest < logits_numel, results
    assert largest <= 1024 * 32, results


# ---- the recipe key


def test_recipe_key_sets_the_config_and_bad_values_fail_early():
    from megahf.recipe import RecipeError
    from megahf.training import load_recipe
    from megahf.training.setup import build_config

    assert build_config(load_recipe(None, []).model).loss_chunk_size == 1024  # on by default for training
    assert build_config(load_recipe(None, ["--loss_chunk_size", "0"]).model).loss_chunk_size == 0
    bert = load_recipe(None, ["--model", "bert-tiny", "--tokenizer", "bert-uncased-embedded"])
    assert build_config(bert.model).loss_chunk_size == 1024  # BERT: the head on the labeled positions, chunked
    with pytest.raises(RecipeError, match=r"loss_chunk_size=-5 is invalid"):
        load_recipe(None, ["--loss_chunk_size", "-5"])
    with pytest.raises(RecipeError, match=r"model_overrides.loss_chunk_size=8: .* recipe key loss_chunk_size"):
        load_recipe(None, ["--model_overrides.loss_chunk_size", "8"])


def test_an_output_layer_with_a_forward_of_its_own_takes_the_plain_path():
    """A LoRA-wrapped or quantized output layer computes more than `hidden @ weight.T`: the chunk loop, which reads
    the weight alone, must not stand in for it."""

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    model = tiny("llama", 5).train()
    layer = Scaled(32, model.config.padded_vocab_size, bias=False)
    layer.weight = model.output_layer.weight
    model.output_layer = layer
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is not None  # the plain path ran
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert rel_err(out.loss, expected) <= TOLERANCE
