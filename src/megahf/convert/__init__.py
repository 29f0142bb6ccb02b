"""Checkpoint converters: transformers' BERT (MegatronBert, Bert) <-> megahf's Megatron BERT."""

from .hf_bert import from_transformers, to_transformers

__all__ = ["from_transformers", "to_transformers"]
