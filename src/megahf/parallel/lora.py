"""LoRA adapters under tensor parallelism, sharded as their base layers are (Megatron-Bridge's layout).

peft wraps an adapted linear layer `X` in a module holding `X.base_layer` (the original layer) and, per adapter,
`X.lora_A.<name>` (r x in) and `X.lora_B.<name>` (out x r), adding `B(A(x))` to the base layer's output. The model's
tensor-parallel plan names `X`; `lora_tp_plan` moves the rule onto `X.base_layer` and shards the adapter with it:

    X colwise (output features split):  B colwise (its output rows split alike), A replicated (input replicated)
    X rowwise (input features split):   A rowwise (its input columns split alike, the r outputs all-reduced),
                                         B replicated

so every rank holds the adapter slice that meets its slice of the base layer, and adding `B(A(x))` needs no further
communication. A replicated factor receives the same gradient on every rank of the tensor-parallel group (its input
and its output gradient are replicated there). Under FSDP2 the adapters belong to their layer's unit and are
sharded with it; nothing here is needed for that.
"""

from __future__ import annotations

from torch import nn

# The base layer's style -> (lora_A's, lora_B's); None: replicated.
ADAPTER_STYLES = {"colwise": (None, "colwise"), "rowwise": ("rowwise", None)}


def is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA wrapper (`base_layer` + `lora_A`/`lora_B` per adapter), recognised without importing peft."""
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def lora_tp_plan(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """`plan` (keys with `*` for the layer number) with each rule that names peft LoRA wrappers moved onto their base
    layers and their adapters' factors. A wrapped layer of a style without an adapter layout is refused."""
    from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

    wrapped: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if is_lora_layer(module):
            wrapped.setdefault(replace_layer_number_by_wildcard(name), module)
    if not wrapped:
        return plan
    adapted = {}
    for key, style in plan.items():
        module = wrapped.get(key)
        if module is None:
            adapted[key] = style
            continue
        if style not in ADAPTER_STYLES:
            raise ValueError(f"LoRA on {key} (tensor-parallel style {style!r}) has no sharded layout: adapt only "
                             f"layers split {' or '.join(ADAPTER_STYLES)} (lora_target_modules), or set tp_size=1")
        adapted[f"{key}.base_layer"] = style
        a_style, b_style = ADAPTER_STYLES[style]
        for adapter in module.lora_A:
            if a_style:
                adapted[f"{key}.lora_A.{adapter}"] = a_style
            if b_style:
                adapted[f"{key}.lora_B.{adapter}"] = b_style
    return adapted


__all__ = ["ADAPTER_STYLES", "is_lora_layer", "lora_tp_plan"]
