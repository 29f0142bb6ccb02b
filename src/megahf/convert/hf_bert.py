"""transformers' BERT weights <-> megahf's Megatron BERT, both ways, with equal outputs.

NVIDIA's published Megatron BERT checkpoints live as transformers `MegatronBert*` models (pre-LayerNorm); the
original BERT (`Bert*`, post-LayerNorm) maps onto megahf's `layernorm_order="post"`. The differences are names,
Megatron-Core's fused QKV layout (for each head: its query, key and value rows, stacked) and the vocabulary
padding (rows past the checkpoint's are zeros, as Megatron pads).

    from transformers import MegatronBertForPreTraining
    from megahf.convert import from_transformers, to_transformers
    model = from_transformers(MegatronBertForPreTraining.from_pretrained(path), vocab_size=30522)
    hf_model = to_transformers(model)          # back, e.g. to publish in transformers' own format
"""

from __future__ import annotations

import re

import torch
import transformers

from ..models.bert import modeling_megatron_bert as megahf_bert
from ..models.bert.configuration_megatron_bert import MegatronBertConfig

# megahf head class <- the suffix of a transformers class name (MegatronBert* and Bert* alike).
HEADS = {
    "Model": "MegatronBertModel",
    "ForPreTraining": "MegatronBertForPreTraining",
    "ForMaskedLM": "MegatronBertForMaskedLM",
    "ForSequenceClassification": "MegatronBertForSequenceClassification",
    "ForMultipleChoice": "MegatronBertForMultipleChoice",
    "ForQuestionAnswering": "MegatronBertForQuestionAnswering",
    "ForTokenClassification": "MegatronBertForTokenClassification",
}
# transformers config field -> MegatronBertConfig field (same meaning, other name).
CONFIG_FIELDS = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "ffn_hidden_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layernorm_epsilon",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "classifier_dropout": "classifier_dropout",
    "initializer_range": "init_method_std",
    "pad_token_id": "pad_token_id",
    "tie_word_embeddings": "tie_word_embeddings",
}
LABEL_FIELDS = ("id2label", "label2id", "problem_type")


def _suffix(class_name: str) -> tuple[str, str]:
    """("MegatronBert" | "Bert", head suffix) of a transformers class name."""
    match = re.fullmatch(r"(MegatronBert|Bert)(Model|For\w+)", class_name)
    if match is None or match.group(2) not in HEADS:
        raise ValueError(f"Cannot convert a {class_name}: expected one of "
                         f"{', '.join('MegatronBert' + s for s in HEADS)} (or the same Bert* classes).")
    return match.group(1), match.group(2)


def _body_rules(post_ln: bool) -> list[tuple[str, str]]:
    """(transformers body name, megahf body name) regex pairs; QKV is handled separately."""
    layer = r"encoder\.layer\.(\d+)\."
    ours = r"encoder.layers.\1."
    rules = [
        (r"embeddings\.word_embeddings\.", "embedding.word_embeddings."),
        (r"embeddings\.position_embeddings\.", "embedding.position_embeddings."),
        (r"embeddings\.token_type_embeddings\.", "embedding.tokentype_embeddings."),
        (layer + r"attention\.output\.dense\.", ours + "self_attention.linear_proj."),
        (layer + r"intermediate\.dense\.", ours + "mlp.linear_fc1."),
        (layer + r"output\.dense\.", ours + "mlp.linear_fc2."),
        (r"pooler\.dense\.", "pooler.dense."),
    ]
    if post_ln:
        rules += [
            (r"embeddings\.LayerNorm\.", "embedding.layernorm."),
            (layer + r"attention\.output\.LayerNorm\.", ours + "post_attention_layernorm."),
            (layer + r"output\.LayerNorm\.", ours + "post_mlp_layernorm."),
        ]
    else:
        rules += [
            (layer + r"attention\.ln\.", ours + "input_layernorm."),
            (layer + r"ln\.", ours + "pre_mlp_layernorm."),
            (r"encoder\.ln\.", "encoder.final_layernorm."),
        ]
    return rules


def _head_rules(suffix: str) -> list[tuple[str, str]]:
    classifier = "multichoice_head." if suffix == "ForMultipleChoice" else "classification_head."
    return [
        (r"cls\.predictions\.transform\.dense\.", "lm_head.dense."),
        (r"cls\.predictions\.transform\.LayerNorm\.", "lm_head.layer_norm."),
        (r"cls\.predictions\.bias", "output_layer.bias"),
        (r"cls\.seq_relationship\.", "binary_head."),
        (r"classifier\.", classifier),
        (r"qa_outputs\.", "qa_outputs."),
    ]


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Megatron-Core's fused QKV: for each head, its query rows, then its key rows, then its value rows."""
    return torch.stack([t.reshape(heads, -1, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(-1, *q.shape[1:])


def _split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in qkv.reshape(heads, 3, -1, *qkv.shape[1:]).unbind(1))


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] > rows:
        raise ValueError(f"The checkpoint has {tensor.shape[0]} vocabulary rows but the config pads to {rows}: "
                         "pass a vocab_size that is at least the checkpoint's.")
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def config_from_transformers(hf_config, vocab_size: int | None = None) -> MegatronBertConfig:
    """MegatronBertConfig of a transformers `MegatronBertConfig` (pre-LN) or `BertConfig` (post-LN).
    `vocab_size`: the tokenizer's vocabulary when the checkpoint's rows are Megatron-padded (e.g. 30522 for a
    30592-row uncased checkpoint); by default every row is a token."""
    if hf_config.model_type not in ("megatron-bert", "bert"):
        raise ValueError(f"model_type={hf_config.model_type!r} is not a BERT: expected 'megatron-bert' or 'bert'.")
    if hf_config.hidden_act not in ("gelu", "gelu_python"):
        raise ValueError(f"hidden_act={hf_config.hidden_act!r}: Megatron's BERT uses the exact 'gelu'.")
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={hf_config.position_embedding_type!r}: only 'absolute' maps "
                         "onto Megatron's learned positions.")
    fields = {ours: getattr(hf_config, theirs) for theirs, ours in CONFIG_FIELDS.items() if hasattr(hf_config, theirs)}
    fields.update({key: getattr(hf_config, key) for key in LABEL_FIELDS if getattr(hf_config, key, None) is not None})
    if vocab_size is not None and vocab_size > hf_config.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is larger than the checkpoint's {hf_config.vocab_size} rows.")
    config = MegatronBertConfig(
        vocab_size=vocab_size or hf_config.vocab_size,
        layernorm_order="pre" if hf_config.model_type == "megatron-bert" else "post",
        **fields,
    )
    if config.padded_vocab_size < hf_config.vocab_size:
        raise ValueError(f"vocab_size={config.vocab_size} pads to {config.padded_vocab_size} rows, fewer than the "
                         f"checkpoint's {hf_config.vocab_size}: pass the tokenizer's vocabulary size.")
    return config


def config_to_transformers(config: MegatronBertConfig):
    """transformers `MegatronBertConfig` (pre-LN) or `BertConfig` (post-LN) of the same model. Its vocab_size is
    the padded one: every row is kept, as in NVIDIA's published checkpoints, so the round trip is lossless."""
    hf_class = transformers.MegatronBertConfig if config.layernorm_order == "pre" else transformers.BertConfig
    fields = {theirs: getattr(config, ours) for theirs, ours in CONFIG_FIELDS.items()}
    fields.update({key: getattr(config, key) for key in LABEL_FIELDS if getattr(config, key, None) is not None})
    return hf_class(vocab_size=config.padded_vocab_size, hidden_act="gelu", **fields)


def state_dict_from_transformers(state_dict: dict, config: MegatronBertConfig, hf_class_name: str,
                                 fuse=None, pad=None) -> dict:
    """Rename (and fuse) a transformers BERT state dict into megahf's names for `config`. `fuse(q, k, v)` and
    `pad(rows)` make the fused QKV and the padded vocabulary of the values (by default tensors; `hf_bert_folder` passes
    unread `TensorRef`s and their lazy counterparts)."""
    fuse = fuse or (lambda q, k, v: _fuse_qkv(q, k, v, config.num_attention_heads))
    pad = pad or (lambda tensor: _pad_rows(tensor, config.padded_vocab_size))
    family, suffix = _suffix(hf_class_name)
    body_prefix, ours_prefix = ("", "") if suffix == "Model" else ("bert.", "model.")
    body = [(re.compile(re.escape(body_prefix) + a), ours_prefix + b) for a, b in _body_rules(family == "Bert")]
    head = [(re.compile(a), b) for a, b in _head_rules(suffix)]
    qkv = re.compile(re.escape(body_prefix)
                     + r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)")
    out, pieces = {}, {}
    for key, tensor in state_dict.items():
        if match := qkv.fullmatch(key):
            layer, which, kind = match.groups()
            pieces.setdefault((layer, kind), {})[which] = tensor
            continue
        if key.endswith("position_ids") or key.startswith("cls.predictions.decoder."):
            continue  # a buffer, and the tied output layer (the embedding and cls.predictions.bias)
        for pattern, replacement in body + head:
            if pattern.match(key):
                out[pattern.sub(replacement, key, count=1)] = tensor
                break
        else:
            raise ValueError(f"No megahf name for the transformers key {key!r}.")
    for (layer, kind), parts in pieces.items():
        out[f"{ours_prefix}encoder.layers.{layer}.self_attention.linear_qkv.{kind}"] = fuse(
            parts["query"], parts["key"], parts["value"])
    for key in (f"{ours_prefix}embedding.word_embeddings.weight", "output_layer.bias"):
        if key in out:
            out[key] = pad(out[key])
    return out


def state_dict_to_transformers(state_dict: dict, config: MegatronBertConfig, megahf_class_name: str) -> dict:
    """megahf's state dict in transformers' names (the inverse of `state_dict_from_transformers`)."""
    suffix = next(s for s, name in HEADS.items() if name == megahf_class_name)
    body_prefix, ours_prefix = ("", "") if suffix == "Model" else ("bert.", "model.")
    post_ln = config.layernorm_order == "post"

    def inverse(rules, theirs_prefix, our_prefix):
        # Turn each (their regex, our replacement) into (our regex, their replacement).
        result = []
        for theirs, ours in rules:
            ours_re = re.escape(our_prefix + ours).replace(re.escape(r"\1"), r"(\d+)")
            theirs_sub = theirs_prefix + theirs.replace("\\.", ".").replace(r"(\d+)", r"\1")
            result.append((re.compile(ours_re), theirs_sub))
        return result

    rules = inverse(_body_rules(post_ln), body_prefix, ours_prefix) + inverse(_head_rules(suffix), "", "")
    qkv = re.compile(re.escape(ours_prefix) + r"encoder\.layers\.(\d+)\.self_attention\.linear_qkv\.(weight|bias)")
    out = {}
    for key, tensor in state_dict.items():
        if match := qkv.fullmatch(key):
            layer, kind = match.groups()
            for which, part in zip(("query", "key", "value"), _split_qkv(tensor, config.num_attention_heads)):
                out[f"{body_prefix}encoder.layer.{layer}.attention.self.{which}.{kind}"] = part
            continue
        if key == "output_layer.weight":
            continue  # tied to the word embeddings
        for pattern, replacement in rules:
            if pattern.match(key):
                out[pattern.sub(replacement, key, count=1)] = tensor
                break
        else:
            raise ValueError(f"No transformers name for the megahf key {key!r}.")
    return out


def from_transformers(hf_model, vocab_size: int | None = None):
    """The megahf Megatron BERT equal to a transformers `MegatronBert*` / `Bert*` model (same head)."""
    _, suffix = _suffix(type(hf_model).__name__)
    config = config_from_transformers(hf_model.config, vocab_size)
    model_class = getattr(megahf_bert, HEADS[suffix])
    hf_state = hf_model.state_dict()
    kwargs = {"add_pooling_layer": "pooler.dense.weight" in hf_state} if suffix == "Model" else {}
    with torch.device("meta"):
        model = model_class(config, **kwargs)
    state = state_dict_from_transformers(hf_state, config, type(hf_model).__name__)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "output_layer.weight"]
    if missing or unexpected:
        raise ValueError(f"Converted weights do not fit {model_class.__name__}: missing {missing}, "
                         f"unexpected {unexpected}.")
    model.tie_weights()
    return model.train(hf_model.training)


def to_transformers(model):
    """The transformers `MegatronBert*` (pre-LN) or `Bert*` (post-LN) model equal to a megahf Megatron BERT."""
    name = type(model).__name__
    suffix = next((s for s, n in HEADS.items() if n == name), None)
    if suffix is None:
        raise ValueError(f"Cannot convert a {name}: expected one of {', '.join(HEADS.values())}.")
    hf_config = config_to_transformers(model.config)
    family = "MegatronBert" if model.config.layernorm_order == "pre" else "Bert"
    hf_class = getattr(transformers, family + suffix)
    hf_model = hf_class(hf_config)  # on the CPU: transformers' BERT keeps a position-id buffer that meta would lose
    state = state_dict_to_transformers(model.state_dict(), model.config, name)
    if suffix in ("ForPreTraining", "ForMaskedLM"):
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    missing, unexpected = hf_model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("cls.predictions.decoder.weight")]
    if missing or unexpected:
        raise ValueError(f"Converted weights do not fit {hf_class.__name__}: missing {missing}, "
                         f"unexpected {unexpected}.")
    hf_model.tie_weights()
    return hf_model.train(model.training)


__all__ = [
    "config_from_transformers",
    "config_to_transformers",
    "from_transformers",
    "state_dict_from_transformers",
    "state_dict_to_transformers",
    "to_transformers",
]
