"""Megatron's padded vocabulary, kept out of sight of transformers users.

The word embeddings (and the output layer tied to them) hold `padded_vocab_size` rows: `vocab_size` rounded up to
`make_vocab_size_divisible_by`, so that tensor parallelism can split them evenly. The rows past `vocab_size` stand
for no token. What a user sees follows from that one rule:

* logits stop at `vocab_size` (a padded row can never be generated or scored);
* the language-model loss is the cross entropy of exactly those logits, so that an evaluation computed from the
  logits (LAMBADA, WikiText, lm-evaluation-harness, Trainer's `compute_metrics`) agrees with the model's own loss.
  `padded_vocab_softmax=True` on the config brings back Megatron-LM's training loss, whose softmax also covers the
  padded rows;
* `resize_token_embeddings(n)` sets `vocab_size = n` and keeps the rows at `padded_vocab_size` (n rounded up), new
  rows initialised as transformers does (around the mean of the real rows), so that save and reload agree;
* `from_pretrained(..., vocab_size=n)` for a checkpoint of another vocabulary is refused: the padded shapes would
  often match and the checkpoint's rows would be silently reinterpreted.
"""

from __future__ import annotations

import math

import torch
from transformers.loss.loss_utils import ForCausalLMLoss, ForMaskedLMLoss


def _vocab_logits(logits: torch.Tensor, vocab_size: int, padded_vocab_softmax: bool) -> torch.Tensor:
    return logits if padded_vocab_softmax else logits[..., :vocab_size]


def causal_lm_loss(logits, labels=None, vocab_size: int = 0, padded_vocab_softmax: bool = False, **kwargs):
    """Next-token cross entropy over the real vocabulary (transformers' `ForCausalLMLoss`: `labels` are shifted
    inside; `shift_labels` are already shifted, as Megatron's datasets give them)."""
    logits = _vocab_logits(logits, vocab_size, padded_vocab_softmax)
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], **kwargs)


def masked_lm_loss(logits, labels, vocab_size: int = 0, padded_vocab_softmax: bool = False, **kwargs):
    """Cross entropy at the masked positions (labels other than -100), over the real vocabulary."""
    logits = _vocab_logits(logits, vocab_size, padded_vocab_softmax)
    return ForMaskedLMLoss(logits, labels, vocab_size=logits.shape[-1], **kwargs)


class PaddedVocabMixin:
    """Mixed into a `PreTrainedModel` whose config has `vocab_size`, `padded_vocab_size` and
    `make_vocab_size_divisible_by`."""

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True):
        """Resize to `new_num_tokens` real tokens. The embedding keeps `padded_vocab_size` rows (`new_num_tokens`
        rounded up to `pad_to_multiple_of`, by default `make_vocab_size_divisible_by`); rows that become real tokens
        are initialised the way transformers initialises new rows, from the old real rows only."""
        if new_num_tokens is None:
            return self.get_input_embeddings()
        multiple = pad_to_multiple_of or self.config.make_vocab_size_divisible_by
        if not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"resize_token_embeddings: new_num_tokens={new_num_tokens!r} must be a positive integer.")
        old_vocab = self.config.vocab_size
        # Drop the padded rows first, so that transformers' mean-resizing reads the real rows only, then grow (or
        # cut) to the new padded size. `super()` sets config.vocab_size to the row count each time; put it back.
        super().resize_token_embeddings(min(old_vocab, new_num_tokens), mean_resizing=False)
        embeddings = super().resize_token_embeddings(math.ceil(new_num_tokens / multiple) * multiple,
                                                     mean_resizing=mean_resizing)
        self.config.make_vocab_size_divisible_by = multiple
        self.config.vocab_size = new_num_tokens
        return embeddings

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        vocab_size = kwargs.get("vocab_size")
        if vocab_size is not None and pretrained_model_name_or_path is not None and kwargs.get("config") is None:
            stored = cls.config_class.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
            if stored.vocab_size != vocab_size:
                raise ValueError(
                    f"{cls.__name__}.from_pretrained: vocab_size={vocab_size} does not match the checkpoint's "
                    f"vocab_size={stored.vocab_size} ({pretrained_model_name_or_path}). Load it without vocab_size, "
                    f"then call model.resize_token_embeddings({vocab_size})."
                )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
               "trust_remote_code")


def _hub_kwargs(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
