"""Megatron's padded vocabulary, kept out of sight of transformers users.

The word embeddings (and the output layer tied to them) hold `padded_vocab_size` rows: `vocab_size` rounded up to
`make_vocab_size_divisible_by`, so that tensor parallelism can split them evenly. The rows past `vocab_size` stand
for no token. What a user sees follows from that one rule:

* logits stop at `vocab_size` (a padded row can never be generated or scored);
* the language-model loss is the cross entropy of exactly those logits, so that an evaluation computed from the
  logits (LAMBADA, WikiText, lm-evaluation-harness, Trainer's `compute_metrics`) agrees with the model's own loss.
  `padded_vocab_softmax=True` on the config brings back Megatron-LM's training loss, whose softmax also covers the
  padded rows;
* `resize_token_embeddings(n)` gives n rows as in transformers (no padding), `resize_token_embeddings(n,
  pad_to_multiple_of=128)` n rounded up with `vocab_size` still n; either way `padded_vocab_size` is the row count
  (save and reload agree) and new rows are initialised as transformers does, around the mean of the real rows;
* `from_pretrained(..., vocab_size=n)` (or a `config` of another vocabulary) for a checkpoint of another vocabulary
  raises, as a size mismatch does in transformers: the padded shapes would often match and the checkpoint's rows
  would be silently reinterpreted.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedConfig
from transformers.loss.loss_utils import ForCausalLMLoss, ForMaskedLMLoss
from transformers.utils import logging


def _vocab_logits(logits: torch.Tensor, vocab_size: int, padded_vocab_softmax: bool) -> torch.Tensor:
    """The logits the softmax covers, flattened to [tokens, vocabulary] (transformers' losses `view` them, which a
    slice of the padded columns does not always allow; `reshape` copies only then)."""
    logits = logits if padded_vocab_softmax else logits[..., :vocab_size]
    return logits.reshape(-1, logits.shape[-1])


def causal_lm_loss(logits, labels=None, vocab_size: int = 0, padded_vocab_softmax: bool = False, **kwargs):
    """Next-token cross entropy over the real vocabulary (transformers' `ForCausalLMLoss`: `labels` are shifted
    inside; `shift_labels` are already shifted, as Megatron's datasets give them)."""
    logits = _vocab_logits(logits, vocab_size, padded_vocab_softmax)
    if kwargs.get("shift_labels") is not None:  # often a slice of the sample (tokens[:, 1:]): `view` needs it flat
        kwargs["shift_labels"] = kwargs["shift_labels"].reshape(-1)
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
        """Resize to `new_num_tokens` tokens. As in transformers the matrix then has exactly `new_num_tokens` rows;
        with `pad_to_multiple_of` it has that many rounded up, and unlike transformers `vocab_size` stays
        `new_num_tokens` (Megatron's padding: the extra rows stand for no token; `make_vocab_size_divisible_by`
        becomes `pad_to_multiple_of`). Rows that become tokens are initialised as transformers initialises new rows,
        from the old real rows only (never from padding)."""
        if new_num_tokens is None and pad_to_multiple_of is None:
            return self.get_input_embeddings()
        if pad_to_multiple_of is not None and not isinstance(pad_to_multiple_of, int):
            return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of)  # raises transformers' error
        new_num_tokens = self.config.vocab_size if new_num_tokens is None else new_num_tokens
        if not isinstance(new_num_tokens, int) or isinstance(new_num_tokens, bool) or new_num_tokens < 1:
            raise ValueError(f"resize_token_embeddings: new_num_tokens={new_num_tokens!r} must be a positive integer.")
        multiple = pad_to_multiple_of or 1
        # Drop the padded rows first, so that transformers' mean-resizing reads the real rows only, then grow (or
        # cut) to the new row count. `super()` sets config.vocab_size to the row count each time; put it back.
        super().resize_token_embeddings(min(self.config.vocab_size, new_num_tokens), mean_resizing=False)
        embeddings = super().resize_token_embeddings(math.ceil(new_num_tokens / multiple) * multiple,
                                                     mean_resizing=mean_resizing)
        self.config.make_vocab_size_divisible_by = multiple
        self.config.vocab_size = new_num_tokens
        return embeddings

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, plus the size check its shapes cannot make here: a `vocab_size` (or a
        `config`) other than the checkpoint's raises, as a size mismatch does in transformers; with
        `ignore_mismatched_sizes=True` the word embeddings (and an untied output layer) are initialised anew."""
        config = kwargs.get("config")
        wanted = config.vocab_size if isinstance(config, PreTrainedConfig) else kwargs.get("vocab_size")
        stored = None
        if wanted is not None and pretrained_model_name_or_path is not None:
            stored = cls.config_class.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs)).vocab_size
        mismatched = stored is not None and stored != wanted
        if mismatched and not kwargs.get("ignore_mismatched_sizes"):
            raise RuntimeError(
                f"{cls.__name__}.from_pretrained: vocab_size={wanted} does not match the checkpoint's "
                f"vocab_size={stored} ({pretrained_model_name_or_path}). Load it as it is, then call "
                f"model.resize_token_embeddings({wanted}); or pass ignore_mismatched_sizes=True to initialise the "
                "word embeddings anew."
            )
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if mismatched:
            # On the logger transformers reports its own size mismatches on, in its words.
            logging.get_logger("transformers.modeling_utils").warning(
                f"Reinit due to size mismatch: vocab_size {stored} in the checkpoint, {wanted} asked for; the word "
                "embeddings and the output layer are newly initialised."
            )
            _reinit_vocab_rows(model)
        return model


@torch.no_grad()
def _reinit_vocab_rows(model) -> None:
    """Megatron's init of the word embeddings and of an untied output layer, after loading (transformers' guarded
    init functions skip parameters that were loaded)."""
    std = model.config.init_method_std
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    embeddings.weight.normal_(0.0, std)
    if output is not None and output.weight is not embeddings.weight:
        output.weight.normal_(0.0, std)
    if output is not None and output.bias is not None:
        output.bias.zero_()


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
               "trust_remote_code")


def _hub_kwargs(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
