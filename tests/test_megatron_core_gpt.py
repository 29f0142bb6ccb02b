"""megahf's GPT against Megatron-Core's own `GPTModel` (megatron-core 0.16.1, run on CPU): the same weights under the
same names (megahf's base model adds the `model.` prefix) give the same logits, GPT-2 style and with grouped-query
attention."""

from __future__ import annotations

import pytest
import torch

from megahf import MegatronGPTConfig, MegatronGPTForCausalLM

VOCAB, PADDED, SEQ = 50257, 50304, 10


@pytest.mark.parametrize("query_groups", [4, 2], ids=["mha", "gqa"])
def test_same_names_and_same_logits_as_megatron_core(megatron_core, query_groups):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    shape = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": query_groups}
    config = TransformerConfig(**shape, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                               layernorm_epsilon=1e-5, params_dtype=torch.float32)
    torch.manual_seed(0)
    theirs = GPTModel(config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=PADDED,
                      max_sequence_length=64, share_embeddings_and_output_weights=True).eval()
    with torch.no_grad():  # non-zero biases and norms, so that a swapped one cannot go unnoticed
        for param in theirs.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    state = {("model." + k if k.startswith(("embedding.", "decoder.")) else k): v
             for k, v in theirs.state_dict().items() if not k.endswith("_extra_state")}
    ours = MegatronGPTForCausalLM(MegatronGPTConfig(**shape, vocab_size=VOCAB, max_position_embeddings=64,
                                                    layernorm_epsilon=1e-5))
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert missing == ["output_layer.weight"] and unexpected == []  # the output layer is the tied embedding
    ours.eval()

    input_ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SEQ)[None].expand(2, -1)
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]  # True: not attended
    with torch.no_grad():
        expected = theirs(input_ids, positions, causal)
        actual = ours(input_ids=input_ids).logits
    assert expected.shape == (2, SEQ, PADDED)
    torch.testing.assert_close(actual, expected[..., :VOCAB], rtol=1e-5, atol=1e-5)
