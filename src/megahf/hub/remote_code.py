"""megahf's model code as the Hub's remote code: one flat folder of .py files beside config.json, and the `auto_map`
that points transformers' Auto classes at them, so that
`AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)` works where megahf is not installed.

megahf's models live in `megahf/models/{gpt,bert}/` and share `layers.py`, `padded_vocab.py`, ... one folder up
(`from ..layers import ...`). transformers' loader fetches the files a module imports relatively, but only from the
same folder (`from .layers import ...`). So each file the family's configuration and modeling modules need (followed
through their relative imports) is copied with `from ..x import` rewritten to `from .x import`, and the result is
checked: every relative import must name a shipped file, and nothing may import megahf.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MegahfError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Family:
    model_type: str
    folder: str  # under megahf/models
    configuration: str  # module name (file stem) of the config class
    modeling: str
    config_class: str
    auto_classes: dict[str, str]  # transformers Auto class -> model class in `modeling`


FAMILIES = {
    "megatron_gpt": Family(
        "megatron_gpt", "gpt", "configuration_megatron_gpt", "modeling_megatron_gpt", "MegatronGPTConfig",
        {"AutoModel": "MegatronGPTModel", "AutoModelForCausalLM": "MegatronGPTForCausalLM"},
    ),
    "megatron_bert": Family(
        "megatron_bert", "bert", "configuration_megatron_bert", "modeling_megatron_bert", "MegatronBertConfig",
        {"AutoModel": "MegatronBertModel", "AutoModelForPreTraining": "MegatronBertForPreTraining",
         "AutoModelForMaskedLM": "MegatronBertForMaskedLM",
         "AutoModelForSequenceClassification": "MegatronBertForSequenceClassification",
         "AutoModelForMultipleChoice": "MegatronBertForMultipleChoice",
         "AutoModelForQuestionAnswering": "MegatronBertForQuestionAnswering",
         "AutoModelForTokenClassification": "MegatronBertForTokenClassification"},
    ),
}

# `from ..layers import x` / `from .configuration_megatron_gpt import y` -> `from .layers import x` / unchanged
_RELATIVE = re.compile(r"^(\s*from\s+)\.{1,2}(\w+)(\s+import\b)", flags=re.MULTILINE)


class RemoteCodeError(MegahfError, RuntimeError):
    """megahf's model files cannot be flattened into remote code (a megahf bug, not the user's)."""


def auto_map(family: Family) -> dict[str, str]:
    """config.json's `auto_map`: Auto class -> "module.Class" in the flat folder."""
    return {"AutoConfig": f"{family.configuration}.{family.config_class}",
            **{auto: f"{family.modeling}.{cls}" for auto, cls in family.auto_classes.items()}}


def flat_sources(family: Family) -> dict[str, str]:
    """File name -> source of every file the family's remote code needs, flattened and checked."""
    sources: dict[str, str] = {}
    pending = [MODELS_DIR / family.folder / f"{family.configuration}.py",
               MODELS_DIR / family.folder / f"{family.modeling}.py"]
    while pending:
        path = pending.pop()
        if path.name in sources:
            continue
        source = path.read_text(encoding="utf-8")
        sources[path.name] = _RELATIVE.sub(r"\1.\2\3", source)
        for module in _relative_modules(path, source):
            pending.append(_find_module(path, module))
    for name, source in sources.items():
        _check_flat(name, source, set(sources))
    return dict(sorted(sources.items()))


def write_remote_code(family: Family, folder: Path) -> list[str]:
    """Write the flat files into `folder`; return their names."""
    sources = flat_sources(family)
    for name, source in sources.items():
        (folder / name).write_text(source, encoding="utf-8")
    return list(sources)


def _relative_modules(path: Path, source: str) -> list[tuple[int, str]]:
    modules = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if not node.module:
                raise RemoteCodeError(f"{path}: `from {'.' * node.level} import ...` cannot be flattened; import "
                                      "from a named module (from ..layers import X)")
            modules.append((node.level, node.module))
    return modules


def _find_module(importer: Path, module: tuple[int, str]) -> Path:
    level, name = module
    base = importer.parent
    for _ in range(level - 1):
        base = base.parent
    target = base / (name.replace(".", "/") + ".py")
    if not target.is_file() or MODELS_DIR not in target.parents:
        raise RemoteCodeError(f"{importer} imports {'.' * level}{name}, which is not a file under megahf/models: "
                              "the model code must stay self-contained to load as Hub remote code")
    return target


def _check_flat(name: str, source: str, shipped: set[str]) -> None:
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.level != 1 or f"{node.module}.py" not in shipped:
                raise RemoteCodeError(f"flattened {name} still imports {'.' * node.level}{node.module}")
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        if any(m.split(".")[0] == "megahf" for m in modules):
            raise RemoteCodeError(f"{name} imports megahf: the Hub copy must load without megahf")


__all__ = ["FAMILIES", "Family", "RemoteCodeError", "auto_map", "flat_sources", "write_remote_code"]
