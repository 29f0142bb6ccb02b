"""Register megahf's configs and models with transformers' Auto classes as soon as those can be used, without
importing torch before then.

`import megahf` must make `AutoConfig.from_pretrained(folder)` and `AutoModelForCausalLM.from_pretrained(folder)`
work, but registering needs megahf's model classes, hence torch and transformers' modeling code (~3 s, of which
torch ~1.5 s), which `megahf --help` and `megahf preprocess` never use. transformers' Auto classes themselves import
torch (`from transformers import AutoConfig` takes ~1.2 s here), so nobody can use one before paying for torch: the
registration is done right after `transformers.models.auto.configuration_auto` (where `AutoConfig` and the model
mappings' config table live) has been imported, and costs only megahf's own modules then.

The trick, in this one place: while registration is pending, a `sys.meta_path` finder wraps the loader of every
`transformers.*` and `megahf.*` module so that it knows when the outermost such import has finished. Registering
at that moment, never in the middle of one, is what keeps it safe: transformers' modeling code imports
configuration_auto half-way through its own import, and megahf's models import transformers'. Once registered,
the finder removes itself. Remove this file if transformers gains lazy registration by name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading

from .errors import UnsupportedModelError

_TRIGGER = "transformers.models.auto.configuration_auto"
_WATCHED = ("transformers.", "megahf.")
_lock = threading.RLock()
_state = {"depth": 0, "registering": False, "done": False}


def register_auto_classes() -> None:
    """Register every megahf config and model with its Auto class, and attach megahf's distribution hooks to the
    model classes by importing `megahf.parallel` (idempotent)."""
    with _lock:
        if _state["done"] or _state["registering"]:
            return
        _state["registering"] = True
        try:
            auto = importlib.import_module("transformers")
            bert = importlib.import_module("megahf.models.bert")
            gpt = importlib.import_module("megahf.models.gpt")
            importlib.import_module("megahf.parallel")
            auto.AutoConfig.register(gpt.MegatronGPTConfig.model_type, gpt.MegatronGPTConfig, exist_ok=True)
            auto.AutoConfig.register(bert.MegatronBertConfig.model_type, bert.MegatronBertConfig, exist_ok=True)
            registrations = (
                ("AutoModel", gpt.MegatronGPTConfig, gpt.MegatronGPTModel),
                ("AutoModelForCausalLM", gpt.MegatronGPTConfig, gpt.MegatronGPTForCausalLM),
                ("AutoModel", bert.MegatronBertConfig, bert.MegatronBertModel),
                ("AutoModelForPreTraining", bert.MegatronBertConfig, bert.MegatronBertForPreTraining),
                ("AutoModelForMaskedLM", bert.MegatronBertConfig, bert.MegatronBertForMaskedLM),
                ("AutoModelForSequenceClassification", bert.MegatronBertConfig,
                 bert.MegatronBertForSequenceClassification),
                ("AutoModelForMultipleChoice", bert.MegatronBertConfig, bert.MegatronBertForMultipleChoice),
                ("AutoModelForQuestionAnswering", bert.MegatronBertConfig, bert.MegatronBertForQuestionAnswering),
                ("AutoModelForTokenClassification", bert.MegatronBertConfig,
                 bert.MegatronBertForTokenClassification),
            )
            for auto_name, config, model in registrations:
                getattr(auto, auto_name).register(config, model, exist_ok=True)
            bert_mappings = {id(getattr(auto, name)._model_mapping)
                             for name, config, _ in registrations if config is bert.MegatronBertConfig}
            _refuse_same_name_models(bert.MegatronBertConfig, "megatron-bert", bert_mappings)
            _state["done"] = True
        finally:
            _state["registering"] = False
        if _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)


def _refuse_same_name_models(config_class, transformers_model_type: str, registered: set[int]) -> None:
    """Make every Auto class that megahf does not register for `config_class` refuse it with a clear error.

    transformers' Auto mappings look a config class up by its *name* when it is not registered with them, and
    megahf's `MegatronBertConfig` has the name of transformers' own (model type "megatron-bert", a different
    checkpoint layout). So `AutoModelForCausalLM.from_pretrained(<megahf BERT folder>)` would build transformers'
    `MegatronBertForCausalLM` from megahf's config and fail deep inside (`no attribute 'is_decoder'`). Registering,
    for each such Auto class, a stand-in that raises turns that into an `UnsupportedModelError` (a `ValueError`,
    as transformers raises for an unknown config) saying what to use instead.
    (Renaming megahf's config class would remove the collision but break every `from megahf import
    MegatronBertConfig`.)"""
    modeling_auto = importlib.import_module("transformers.models.auto.modeling_auto")
    for names_attr, names in vars(modeling_auto).items():
        mapping = getattr(modeling_auto, names_attr.removesuffix("_NAMES"), None)
        if not (names_attr.startswith("MODEL_") and names_attr.endswith("_MAPPING_NAMES") and isinstance(names, dict)
                and transformers_model_type in names and hasattr(mapping, "register")):
            continue
        if id(mapping) in registered:
            continue  # megahf's own model is registered here
        mapping.register(config_class, _unsupported_model(config_class, names[transformers_model_type]),
                         exist_ok=True)


def _unsupported_model(config_class, transformers_class_name: str) -> type:
    """A stand-in registered where megahf has no model for `config_class`: loading or building it raises."""
    task = transformers_class_name.partition("For")[2] or transformers_class_name

    def refuse(cls, *args, **kwargs):
        raise UnsupportedModelError(
            f"megahf's {config_class.__name__} (model_type {config_class.model_type!r}) has no {task} model: "
            f"megahf's BERT is an encoder. transformers' {transformers_class_name} only shares the config's class "
            "name; it reads transformers' 'megatron-bert' checkpoints, not megahf's. Load a megahf BERT folder "
            "with AutoModel, AutoModelForPreTraining (masked LM + sentence order), AutoModelForMaskedLM or a task "
            "head (AutoModelForSequenceClassification, ...TokenClassification, ...QuestionAnswering, "
            "...MultipleChoice), after `import megahf`; for text generation train a MegatronGPT model"
        )

    return type(f"Unsupported{transformers_class_name}", (), {
        "__module__": __name__, "__doc__": _unsupported_model.__doc__, "config_class": config_class,
        "from_pretrained": classmethod(refuse), "from_config": classmethod(refuse), "_from_config": classmethod(refuse),
    })


class _ImportEndLoader(importlib.abc.Loader):
    """Runs the wrapped loader, then registers once the outermost watched import has ended, if the Auto classes
    are loaded by then. Everything else is the wrapped loader's."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with _lock:
            _state["depth"] += 1
        try:
            self._loader.exec_module(module)
        finally:
            with _lock:
                _state["depth"] -= 1
                outermost = _state["depth"] == 0
        if outermost and _TRIGGER in sys.modules:
            register_auto_classes()


class _ImportEndFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if _state["done"] or not fullname.startswith(_WATCHED):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ImportEndLoader(spec.loader)
                return spec
        return None


_FINDER = _ImportEndFinder()


def register_when_auto_classes_load() -> None:
    """Register now if transformers' Auto classes are already loaded, else as soon as they are."""
    if _TRIGGER in sys.modules:
        register_auto_classes()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


__all__ = ["register_auto_classes", "register_when_auto_classes_load"]
