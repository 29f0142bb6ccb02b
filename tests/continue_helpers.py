"""The checkpoints continued pretraining is tested on (tests/test_continue_pretraining.py, tests/distributed/): tiny
transformers Llama (grouped-query attention), GPT-2 and BERT folders as `save_pretrained` writes them, and a megahf
folder, each with the tokenizer it was made for.

Weights are drawn with std 0.1 (transformers' 0.02 gives near-uniform logits, whose differences say little): the logits
and losses compared across layouts are then of order one.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers

from megahf.assets import load_bert_tokenizer
from megahf.assets import load_gpt2_tokenizer as _load_gpt2_tokenizer

HIDDEN, LAYERS, HEADS, GROUPS = 64, 2, 4, 2
STD = 0.1


@functools.lru_cache(maxsize=1)
def load_gpt2_tokenizer():
    return _load_gpt2_tokenizer()  # loaded once for the three folders that hold it (loading takes a while)


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Llama 3.1 / 3.2's RoPE (base 500k, its "llama3" scaling of the low frequencies, factor 8 here) over an original
# context of 16 positions, so that every test sequence (24 to 48 tokens) runs past it
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def llama_folder(folder: Path, max_positions: int = 256, tie: bool = False, hidden: int = HIDDEN, heads: int = HEADS,
                 groups: int = GROUPS) -> Path:
    """A transformers LlamaForCausalLM shaped as Llama 3.x: 4 query heads in 2 key/value groups, Llama 3's RoPE
    scaling (`LLAMA3_ROPE`), untied output layer; GPT-2's tokenizer."""
    tokenizer = load_gpt2_tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=176, num_hidden_layers=LAYERS, num_attention_heads=heads,
        num_key_value_heads=groups, vocab_size=len(tokenizer), max_position_embeddings=max_positions,
        rope_parameters=dict(LLAMA3_ROPE), tie_word_embeddings=tie,
        initializer_range=STD, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    return _save(transformers.LlamaForCausalLM(config), tokenizer, folder)


def gpt2_folder(folder: Path, positions: int = 64) -> Path:
    """A transformers GPT2LMHeadModel (learned positions, tied output layer), no dropout, its own tokenizer."""
    tokenizer = load_gpt2_tokenizer()
    config = transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=len(tokenizer),
                                     n_positions=positions, initializer_range=STD, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(2)
    return _save(transformers.GPT2LMHeadModel(config), tokenizer, folder)


def bert_folder(folder: Path, head=transformers.BertForMaskedLM, max_positions: int = 128) -> Path:
    """A transformers BertForMaskedLM (post-LayerNorm, the original BERT), no dropout, the uncased WordPiece."""
    tokenizer = load_bert_tokenizer()
    config = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                     intermediate_size=4 * HIDDEN, vocab_size=len(tokenizer),
                                     max_position_embeddings=max_positions,
                                     initializer_range=STD, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    return _save(head(config), tokenizer, folder)


def megahf_folder(folder: Path) -> Path:
    """A megahf Llama-style MegatronGPTForCausalLM (what a `megahf pretrain` run leaves in final/)."""
    from megahf import MegatronGPTConfig, MegatronGPTForCausalLM

    tokenizer = load_gpt2_tokenizer()
    config = MegatronGPTConfig.from_preset("llama-tiny", hidden_size=HIDDEN, num_layers=LAYERS,
                                           num_attention_heads=HEADS, num_query_groups=GROUPS,
                                           vocab_size=len(tokenizer), init_method_std=STD,
                                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(4)
    return _save(MegatronGPTForCausalLM(config), tokenizer, folder)


FOLDERS = {"llama": llama_folder, "gpt2": gpt2_folder, "bert": bert_folder, "megahf": megahf_folder}
# the recipe keys each kind of checkpoint continues with: its own tokenizer; BERT's masked-LM data and sample
RUN_KEYS = {
    "llama": {}, "gpt2": {}, "megahf": {},
    "bert": {"split": "80,20,0", "eval_iters": 1, "sample_prompt": "The king [MASK] the queen."},
}


def make_folder(kind: str, root: Path) -> Path:
    return FOLDERS[kind](root / kind)


@torch.no_grad()
def reference_logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits transformers computes with the folder's own model class (the megahf folder: megahf's class)."""
    import megahf  # noqa: F401  (registers megahf's classes with the Auto classes)

    config = transformers.AutoConfig.from_pretrained(folder)
    model_class = getattr(transformers, config.architectures[0], None)
    if model_class is None:
        model_class = getattr(megahf, config.architectures[0])
    model = model_class.from_pretrained(folder, dtype=torch.float32).eval()
    output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return output.logits[..., :config.vocab_size].float()
