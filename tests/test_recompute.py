"""Selective recomputation of the attention core (`recompute_granularity="selective"`, the recipe's `recompute:
selective`) in one process: the same gradients as keeping everything, dropout included, and the attention
probabilities are no longer kept for the backward pass."""

from __future__ import annotations

import pytest
import torch

from megahf import MegatronBertConfig, MegatronBertForMaskedLM, MegatronGPTConfig, MegatronGPTForCausalLM

SEQ = 32


def saved_bytes_and_grads(model_class, config, batch) -> tuple[int, int, dict[str, torch.Tensor]]:
    """Bytes of the distinct storages autograd keeps (parameters excluded), how many of the saved tensors are
    attention-score shaped [batch, heads, seq, seq], and every gradient, from one step."""
    torch.manual_seed(0)
    model = model_class(config).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, scores = {}, []

    def pack(t):
        scores.append(t.shape == (2, 4, SEQ, SEQ))
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(1)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return sum(storages.values()), sum(scores), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_selective_recompute_same_gradients_less_memory(family):
    input_ids = torch.randint(5, 1000, (2, SEQ), generator=torch.Generator().manual_seed(2))
    if family == "gpt":
        model_class, make = MegatronGPTForCausalLM, MegatronGPTConfig.from_preset
        preset, batch = "gpt-tiny", {"input_ids": input_ids, "labels": input_ids}
    else:
        model_class, make = MegatronBertForMaskedLM, MegatronBertConfig.from_preset
        preset, batch = "bert-tiny", {"input_ids": input_ids, "labels": input_ids.masked_fill(input_ids % 3 > 0, -100)}
    kwargs = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "attention_dropout": 0.2,
              "hidden_dropout": 0.2, "attn_implementation": "eager"}
    kept, kept_scores, grads = saved_bytes_and_grads(model_class, make(preset, **kwargs), batch)
    recomputed, recomputed_scores, selective_grads = saved_bytes_and_grads(
        model_class, make(preset, recompute_granularity="selective", **kwargs), batch)
    # The recomputation replays the same operations with the same dropout masks: identical gradients.
    assert [n for n in grads if not torch.equal(grads[n], selective_grads[n])] == []
    # No attention-score-shaped tensor (softmax output, dropout mask, probabilities) is kept any more; at least one
    # fp32 one per layer was (4 bytes x batch x heads x seq^2 each).
    assert kept_scores >= 2 and recomputed_scores == 0, (kept_scores, recomputed_scores)
    assert kept - recomputed >= 2 * 4 * 2 * 4 * SEQ * SEQ, (kept, recomputed)


def test_recompute_granularity_is_checked():
    with pytest.raises(ValueError, match=r"recompute_granularity='full' is invalid.*activation_checkpointing_enable"):
        MegatronGPTConfig.from_preset("gpt-tiny", recompute_granularity="full")
