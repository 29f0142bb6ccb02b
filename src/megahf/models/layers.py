"""Building blocks shared by Megatron's GPT and BERT: norms, self-attention with the fused QKV layout, the MLP and
Megatron's weight init. Module names are Megatron-Core's; nothing here knows about parallelism."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward


def build_norm(config) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class MegatronSelfAttention(nn.Module):
    """Self-attention with Megatron-Core's fused QKV: for each query group, its query heads, then its key, then
    its value are stacked along the output dimension, so a contiguous column split is a split by groups."""

    def __init__(self, config, layer_idx: int, is_causal: bool = True):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.num_key_value_groups = self.heads_per_group  # read by transformers' attention functions
        self.scaling = self.head_dim**-0.5
        self.is_causal = is_causal  # read by transformers' attention functions
        qkv_size = (config.num_attention_heads + 2 * config.num_query_groups) * self.head_dim
        self.linear_qkv = nn.Linear(config.hidden_size, qkv_size, bias=config.add_bias_linear)
        self.linear_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                     bias=config.add_bias_linear)
        self.linear_proj.is_block_output = True  # Megatron's scaled init of the residual-branch outputs

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        qkv = self.linear_qkv(hidden_states)
        # The projection's length, not the input's: under sequence parallelism it gathers the whole sequence from a
        # shard. -1 groups: under tensor parallelism this rank holds only its share of the groups.
        batch, seq = qkv.shape[:2]
        qkv = qkv.view(batch, seq, -1, self.heads_per_group + 2, self.head_dim)
        # split, not indexing: its backward is one cat instead of a zero-filled full-size buffer per piece
        query, key, value = qkv.split([self.heads_per_group, 1, 1], dim=3)
        query = query.reshape(batch, seq, -1, self.head_dim).transpose(1, 2)
        key = key.squeeze(3).transpose(1, 2)
        value = value.squeeze(3).transpose(1, 2)

        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = self.config.attention_dropout if self.training else 0.0
        if self.config.recompute_granularity == "selective" and self.training and torch.is_grad_enabled():
            # Selective recomputation (Korthikanti et al. 2022): keep only q, k, v; the scores, softmax, dropout mask
            # and probabilities (5 a s^2 b bytes per layer in 16 bits) are recomputed in the backward pass, with the
            # same dropout mask (the RNG state is replayed).
            output, weights = checkpoint(attention, self, query, key, value, attention_mask, dropout=dropout,
                                         scaling=self.scaling, use_reentrant=False, **kwargs)
        else:
            output, weights = attention(self, query, key, value, attention_mask, dropout=dropout,
                                        scaling=self.scaling, **kwargs)
        return self.linear_proj(output.reshape(batch, seq, -1)), weights


class MegatronMLP(nn.Module):
    """GeLU MLP (`linear_fc1` -> gelu (exact, or its tanh approximation) -> `linear_fc2`) or SwiGLU (silu(gate) * up -> `linear_fc2`).

    Megatron-Core fuses SwiGLU's gate and up into one `linear_fc1` of width 2 x ffn ([gate; up]). Here they are two
    layers, `linear_fc1_gate` and `linear_fc1_up`, so that a plain column split keeps each gate channel with its up
    channel under tensor parallelism, also combined with FSDP2 (transformers' `packed_colwise` style loads wrong
    weights under FSDP2); the converters split and concatenate [gate; up].
    """

    def __init__(self, config):
        super().__init__()
        bias = config.add_bias_linear
        self.gated = config.activation == "swiglu"
        self.activation = config.activation
        if self.gated:
            self.linear_fc1_gate = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=bias)
            self.linear_fc1_up = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=bias)
        else:
            self.linear_fc1 = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=bias)
        self.linear_fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=bias)
        self.linear_fc2.is_block_output = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gated:
            hidden_states = F.silu(self.linear_fc1_gate(hidden_states)) * self.linear_fc1_up(hidden_states)
        else:
            approximate = "tanh" if self.activation == "gelu_tanh" else "none"
            hidden_states = F.gelu(self.linear_fc1(hidden_states), approximate=approximate)
        return self.linear_fc2(hidden_states)


def init_megatron_weights(module: nn.Module, config) -> None:
    """Megatron's init: N(0, std) for every weight, N(0, std / sqrt(2 * layers)) for the output projection of each
    block (`is_block_output`), zero biases, unit norms. Call it from `_init_weights` under `torch.no_grad()`."""
    std = config.init_method_std
    if isinstance(module, nn.Linear):
        is_block_output = getattr(module, "is_block_output", False)
        init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * config.num_layers) if is_block_output else std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            init.zeros_(module.bias)
