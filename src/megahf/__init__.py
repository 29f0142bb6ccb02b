"""megahf: Megatron-LM's models, parallelism and recipes as citizens of the Hugging Face ecosystem.

Importing megahf registers its configs and models with transformers' Auto classes (as soon as those are loaded:
see `auto_registration`). The model classes below are imported on first use, so that `megahf --help` and the data
tools start without torch.
"""

from __future__ import annotations

import importlib
import logging

from .auto_registration import register_when_auto_classes_load

__version__ = "0.1.0"

# public name -> the module that defines it (PEP 562: imported on first access)
_LAZY_NAMES = {
    **dict.fromkeys(
        ("MegatronBertConfig", "MegatronBertForMaskedLM", "MegatronBertForMultipleChoice", "MegatronBertForPreTraining",
         "MegatronBertForQuestionAnswering", "MegatronBertForSequenceClassification",
         "MegatronBertForTokenClassification", "MegatronBertModel"),
        "megahf.models.bert",
    ),
    **dict.fromkeys(("MegatronGPTConfig", "MegatronGPTForCausalLM", "MegatronGPTModel"), "megahf.models.gpt"),
}

register_when_auto_classes_load()

# bitsandbytes 0.50 warns on import, on CPUs with AVX512-BF16, that the optional `kernels` package is missing, then uses
# its own kernel; transformers' Trainer imports it through peft, so every verb printed that line (and an error was no
# longer one line). Its warnings at ERROR and above still show; remove once bitsandbytes stops warning.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


__all__ = [*sorted(_LAZY_NAMES), "__version__"]
