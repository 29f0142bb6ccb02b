"""A peft adapter folder where a model folder is expected (`megahf evaluate --model`, `megahf finetune`'s `model`):
recognised by its `adapter_config.json`, whose `base_model_name_or_path` names the model it adapts. The base is
loaded, and the adapter merged into its weights (peft's `merge_and_unload`); a task head the adapter trained in full
(`modules_to_save`) replaces the base's.

    if is_adapter_folder(path):
        base, _ = adapter_base(path)
        model = merge_adapter(AutoModelForCausalLM.from_pretrained(base), path)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import MegahfError

ADAPTER_CONFIG = "adapter_config.json"


class AdapterFolderError(MegahfError, ValueError):
    """An adapter folder that cannot be used: no readable config, or no base model it names."""


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | os.PathLike) -> tuple[str, dict]:
    """The base model an adapter folder names (a folder or a Hub id) and its adapter config."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterFolderError(f"{file} is not readable JSON ({error}); pass an intact peft adapter folder "
                                 "(written by PeftModel.save_pretrained)") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise AdapterFolderError(f"{file} names no base model (base_model_name_or_path); set it to the folder or "
                                 "Hub id of the model the adapter was trained on")
    return base, config


def merge_adapter(model, path: str | os.PathLike, keep_head: bool = True):
    """`model` (the adapter's base, loaded) with the adapter of `path` merged into its weights. The adapter's fully
    trained modules (`modules_to_save`, the task head) replace the base's; with `keep_head=False` they are left out
    (a head of another size: the base's own stays)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(path))
    config.inference_mode = False
    saved = load_file(Path(path) / "adapter_model.safetensors")
    if not keep_head:  # peft then wraps no module to replace, and expects none of their tensors
        config.modules_to_save = None
        saved = {key: value for key, value in saved.items() if ".lora_" in key}
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, saved)
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if missing or result.unexpected_keys:
        raise AdapterFolderError(f"{path}: the adapter does not fit its base ({len(missing)} adapter tensors missing, "
                                 f"{len(result.unexpected_keys)} unexpected, e.g. "
                                 f"{(missing or result.unexpected_keys)[0]}); pass the base it was trained on")
    # peft froze the base to train the adapter: the merged model is trainable like any model from_pretrained gives
    return peft_model.merge_and_unload().requires_grad_(True)


__all__ = ["ADAPTER_CONFIG", "AdapterFolderError", "adapter_base", "is_adapter_folder", "merge_adapter"]
