"""Checkpoint converters, every direction through megahf's model, each conversion proven (`api.convert`); and the
in-memory transformers BERT converter (`from_transformers`, `to_transformers`).

Formats: `megatron` (Megatron-LM's legacy torch checkpoints, any TP x PP), `megahf` (a model folder or a training
checkpoint), `hf-gpt2`, `hf-llama`, `hf-bert`, `hf-megatron-bert`.
"""

from .api import FORMATS, convert, read_checkpoint, write_checkpoint
from .common import ConversionError
from .hf_bert import from_transformers, to_transformers

__all__ = ["FORMATS", "ConversionError", "convert", "from_transformers", "read_checkpoint", "to_transformers",
           "write_checkpoint"]
