"""Megatron-LM's parameter names (legacy, Megatron-Core, Transformer Engine) <-> megahf's, and the tensor-parallel
rule of each parameter.

Three namings occur in Megatron checkpoints:
* legacy (`megatron/legacy/model`): `language_model.embedding.word_embeddings.weight`,
  `language_model.encoder.layers.{i}.self_attention.query_key_value.weight`, `...self_attention.dense`,
  `...post_attention_layernorm`, `...mlp.dense_h_to_4h`, `...mlp.dense_4h_to_h`, `language_model.output_layer`, and for
  BERT `language_model.pooler`, `lm_head.{dense,layernorm,bias}`, `binary_head`; older files say `transformer` for
  `encoder` and `attention` for `self_attention`;
* Megatron-Core with the local layer spec: `embedding.*`, `decoder.layers.{i}.*` (BERT: `encoder.layers.{i}.*`),
  `self_attention.linear_qkv`, `linear_proj`, `pre_mlp_layernorm`, `mlp.linear_fc1`, `linear_fc2`,
  `decoder.final_layernorm`, `output_layer`: megahf's own names, less the `model.` prefix of the base model;
* Megatron-Core with Transformer Engine: the norms before attention and MLP are fused into the next linear layer as
  `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight` (and `_bias` for LayerNorm).
Everything is first renamed to Megatron-Core's local names ("core names", layer numbers local to the pipeline stage).
"""

from __future__ import annotations

import re

from .common import ConversionError

# legacy layer sub-module -> Megatron-Core's
LEGACY_LAYER = {
    "input_layernorm": "input_layernorm",
    "self_attention.query_key_value": "self_attention.linear_qkv",
    "attention.query_key_value": "self_attention.linear_qkv",
    "self_attention.dense": "self_attention.linear_proj",
    "attention.dense": "self_attention.linear_proj",
    "post_attention_layernorm": "pre_mlp_layernorm",
    "mlp.dense_h_to_4h": "mlp.linear_fc1",
    "mlp.dense_4h_to_h": "mlp.linear_fc2",
}
LEGACY_TOP = {
    "language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "language_model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "language_model.embedding.tokentype_embeddings.weight": "embedding.tokentype_embeddings.weight",
    "language_model.output_layer.weight": "output_layer.weight",
    "language_model.pooler.dense.weight": "pooler.dense.weight",
    "language_model.pooler.dense.bias": "pooler.dense.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layernorm.weight": "lm_head.layer_norm.weight",
    "lm_head.layernorm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "output_layer.bias",
    "binary_head.weight": "binary_head.weight",
    "binary_head.bias": "binary_head.bias",
}
_LEGACY_LAYER_KEY = re.compile(r"language_model\.(?:encoder|transformer)\.layers\.(\d+)\.(.+)\.(weight|bias)")
_LEGACY_FINAL_NORM = re.compile(r"language_model\.(?:encoder|transformer)\.final_layernorm\.(weight|bias)")
_CORE_TE_NORM = re.compile(r"(decoder|encoder)\.layers\.(\d+)\.(self_attention\.linear_qkv|mlp\.linear_fc1)"
                           r"\.layer_norm_(weight|bias)")
_CORE_LAYER_KEY = re.compile(r"(?:decoder|encoder)\.layers\.(\d+)\.(.+)")
_TE_NORM_OF = {"self_attention.linear_qkv": "input_layernorm", "mlp.linear_fc1": "pre_mlp_layernorm"}

# Keys that carry no weight megahf needs: Transformer Engine / Megatron-Core extra state, RoPE frequencies.
IGNORED = re.compile(r".*(_extra_state|\.inv_freq)$")
# The last pipeline stage's copy of tied word embeddings (legacy name; Megatron-Core calls it output_layer.weight).
TIED_HEAD_COPY = "word_embeddings_for_head.weight"

CORE_BASE_PREFIXES = ("embedding.", "decoder.", "encoder.", "pooler.")


def flatten(state: dict, prefix: str = "") -> dict:
    """Legacy checkpoints nest dicts (`model['language_model']['encoder']['layers.0...']`); join them with dots."""
    flat = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def naming_of(keys) -> str:
    """"legacy", "te" (Megatron-Core with Transformer Engine's fused norms) or "core" (local layer spec)."""
    keys = list(keys)
    if any(k.startswith("language_model.") for k in keys):
        return "legacy"
    if any(_CORE_TE_NORM.fullmatch(k) for k in keys):
        return "te"
    return "core"


def family_of(keys) -> str:
    """"bert" if the checkpoint has BERT's heads or token types, else "gpt"."""
    bert_marks = ("lm_head.", "binary_head.", "pooler.", "language_model.pooler.")
    if any(k.startswith(bert_marks) or "tokentype_embeddings" in k for k in keys):
        return "bert"
    return "gpt"


def to_core_name(key: str, family: str) -> str | None:
    """The Megatron-Core local name of a checkpoint key (layer numbers unchanged), None for keys that hold nothing
    megahf needs; ConversionError for a key megahf does not know."""
    body = "decoder" if family == "gpt" else "encoder"
    if IGNORED.fullmatch(key):
        return None
    if key in LEGACY_TOP:
        return LEGACY_TOP[key]
    if match := _LEGACY_LAYER_KEY.fullmatch(key):
        layer, module, kind = match.groups()
        if module not in LEGACY_LAYER:
            raise ConversionError(f"unknown key {key!r} in a legacy Megatron checkpoint (module {module!r}); megahf "
                                  f"knows {', '.join(sorted(LEGACY_LAYER))}")
        return f"{body}.layers.{layer}.{LEGACY_LAYER[module]}.{kind}"
    if match := _LEGACY_FINAL_NORM.fullmatch(key):
        return f"{body}.final_layernorm.{match.group(1)}"
    if match := _CORE_TE_NORM.fullmatch(key):
        _, layer, module, kind = match.groups()
        return f"{body}.layers.{layer}.{_TE_NORM_OF[module]}.{kind}"
    core = key.replace("decoder.", f"{body}.", 1) if key.startswith(("decoder.", "encoder.")) else key
    if core in KNOWN_TOP or (_CORE_LAYER_KEY.fullmatch(core) and
                             _CORE_LAYER_KEY.fullmatch(core).group(2) in KNOWN_LAYER):
        return core
    if key == TIED_HEAD_COPY:
        return key
    raise ConversionError(f"unknown key {key!r} in the Megatron checkpoint: megahf knows Megatron-Core's names "
                          "(decoder.layers.N.self_attention.linear_qkv.weight, ...), Transformer Engine's fused norms "
                          "and the legacy names (language_model.encoder.layers.N...)")


KNOWN_LAYER = {f"{module}.{kind}" for module in ("input_layernorm", "self_attention.linear_qkv",
                                                 "self_attention.linear_proj", "pre_mlp_layernorm", "mlp.linear_fc1",
                                                 "mlp.linear_fc2") for kind in ("weight", "bias")}
KNOWN_TOP = {*LEGACY_TOP.values(), "decoder.final_layernorm.weight", "decoder.final_layernorm.bias",
             "encoder.final_layernorm.weight", "encoder.final_layernorm.bias"}


def layer_of(core_name: str) -> tuple[int, str] | None:
    """(local layer number, the rest) of a layer's core name."""
    match = _CORE_LAYER_KEY.fullmatch(core_name)
    return (int(match.group(1)), match.group(2)) if match else None


def tp_rule(core_name: str, swiglu: bool) -> str:
    """How Megatron splits a parameter over tensor-parallel ranks: "vocab" (rows, over the padded vocabulary), "col"
    (output rows: QKV by query groups, fc1 by channels), "row" (input columns: the projections after them),
    "gate_up" (SwiGLU's fused fc1: each rank holds [its gate rows; its up rows]) or "rep" (replicated)."""
    if core_name in ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias"):
        return "vocab"
    layer = layer_of(core_name)
    if layer is None:
        return "rep"
    rest = layer[1]
    if rest.startswith("self_attention.linear_qkv."):
        return "col"
    if rest == "self_attention.linear_proj.weight" or rest == "mlp.linear_fc2.weight":
        return "row"
    if rest.startswith("mlp.linear_fc1."):
        return "gate_up" if swiglu else "col"
    return "rep"


def core_to_megahf(core_name: str) -> str:
    return ("model." + core_name) if core_name.startswith(CORE_BASE_PREFIXES) else core_name


def megahf_to_core(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def core_to_legacy(core_name: str, family: str) -> str:
    """The legacy (megatron/legacy/model) name of a core name, flattened with dots."""
    for legacy, core in LEGACY_TOP.items():
        if core == core_name:
            return legacy
    if core_name.endswith((".final_layernorm.weight", ".final_layernorm.bias")):
        return "language_model.encoder.final_layernorm." + core_name.rsplit(".", 1)[1]
    layer = layer_of(core_name)
    if layer is None:
        raise ConversionError(f"no legacy Megatron name for {core_name!r}")
    number, rest = layer
    module, kind = rest.rsplit(".", 1)
    legacy_module = next(old for old, new in LEGACY_LAYER.items() if new == module and not old.startswith("attention"))
    return f"language_model.encoder.layers.{number}.{legacy_module}.{kind}"


def core_to_te(core_name: str) -> str:
    """Transformer Engine's name: the norms before attention and MLP live on the next linear layer."""
    layer = layer_of(core_name)
    if layer is not None:
        number, rest = layer
        body = core_name.split(".", 1)[0]
        for fused, norm in _TE_NORM_OF.items():
            if rest.startswith(norm + "."):
                return f"{body}.layers.{number}.{fused}.layer_norm_{rest.rsplit('.', 1)[1]}"
    return core_name


def unflatten(flat: dict) -> dict:
    """Legacy Megatron's nesting: model['language_model'][...] dicts, `encoder` a flat dict of its own."""
    nested: dict = {}
    for key, value in flat.items():
        if key.startswith("language_model.encoder."):
            encoder = nested.setdefault("language_model", {}).setdefault("encoder", {})
            encoder[key[len("language_model.encoder."):]] = value
            continue
        parts = key.split(".")
        if parts[0] == "language_model" and parts[1] in ("embedding", "pooler", "output_layer"):
            head, rest = parts[:2], ".".join(parts[2:])
            if parts[1] == "embedding":
                head, rest = parts[:3], ".".join(parts[3:])
            target = nested
            for part in head:
                target = target.setdefault(part, {})
            target[rest] = value
        elif parts[0] in ("lm_head", "binary_head", "word_embeddings_for_head") and len(parts) > 1:
            nested.setdefault(parts[0], {})[".".join(parts[1:])] = value
        else:
            nested[key] = value
    return nested


__all__ = ["core_to_legacy", "core_to_megahf", "core_to_te", "family_of", "flatten", "layer_of", "megahf_to_core",
           "naming_of", "tp_rule", "to_core_name", "unflatten"]
