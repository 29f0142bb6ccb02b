"""Import transformers' own common model tests, restored from the pinned sdist by scripts/fetch_transformers_tests.py.

The sdist's `tests/*.py` use relative imports (`from .generation.test_utils import GenerationTesterMixin`), so they
must live in a package. They are imported as the package `transformers_common_tests` (not `tests`, which would clash
with megahf's own tests folder), whose search path is the restored folder first and then `shims/` beside this file:
the few modules the sdist imports but does not ship (tests/generation/, tests/exporters/, tests/utils/,
tests/distributed_testing_utils.py live only in transformers' git repository) come from there.

When the tests were not restored this raises, so the test modules fail to import with the fix in the message:
a missing sdist is an error, never a silent skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

PACKAGE = "transformers_common_tests"
_ROOT = Path(__file__).resolve().parents[2]
_SHIMS = Path(__file__).resolve().parent / "shims"


def _fetcher():
    spec = importlib.util.spec_from_file_location("_megahf_fetch_transformers_tests",
                                                  _ROOT / "scripts" / "fetch_transformers_tests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def package() -> types.ModuleType:
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    fetcher = _fetcher()
    if not fetcher.is_restored():
        raise RuntimeError(
            f"transformers {fetcher.TRANSFORMERS_VERSION}'s common model tests are not restored at "
            f"{fetcher.tests_dir()}. Run `python scripts/fetch_transformers_tests.py` once with access to PyPI "
            "(`bash scripts/setup_env.sh` and `bash scripts/test.sh` do it for you).")
    import transformers

    if transformers.__version__ != fetcher.TRANSFORMERS_VERSION:
        raise RuntimeError(f"the restored common tests are transformers {fetcher.TRANSFORMERS_VERSION}'s but "
                           f"transformers {transformers.__version__} is installed: update the pin in "
                           "scripts/fetch_transformers_tests.py together with scripts/requirements-test.txt")
    pkg = types.ModuleType(PACKAGE)
    pkg.__path__ = [str(fetcher.tests_dir()), str(_SHIMS)]
    pkg.__file__ = None
    sys.modules[PACKAGE] = pkg
    return pkg


def load(name: str) -> types.ModuleType:
    """`load("test_modeling_common")` is the sdist's tests/test_modeling_common.py."""
    package()
    return importlib.import_module(f"{PACKAGE}.{name}")


class InTreeNames:
    """Mixin for a test class: list megahf's classes in transformers' auto-mapping name tables while its tests run.

    transformers' common tests choose what to check by class name, from the tables of in-tree models in
    `transformers.models.auto.modeling_auto` (`MODEL_MAPPING_NAMES` for base models that `test_training` leaves
    out, `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` for the heads that get labels and the causal-LM loss checks, ...).
    An in-tree model is listed there by its line in modeling_auto.py; `AutoModel.register` does not add a name to
    those tables. So each test class names its `auto_mapping_names` ({table name: {model_type: class name}}) and
    they are added for the class's tests only, to hold megahf's models to what an in-tree model is held to.
    """

    auto_mapping_names: dict[str, dict[str, str]] = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from transformers.models.auto import modeling_auto

        cls._added_names = []
        for table_name, entries in cls.auto_mapping_names.items():
            table = getattr(modeling_auto, table_name)
            for model_type, class_name in entries.items():
                if model_type not in table:
                    table[model_type] = class_name
                    cls._added_names.append((table, model_type))

    @classmethod
    def tearDownClass(cls):
        for table, model_type in cls._added_names:
            table.pop(model_type, None)
        super().tearDownClass()


class MegatronTensorParallelRules:
    """Mixin for a test class with `TensorParallelTesterMixin`: what megahf's models change in its set-up."""

    def _get_tp_config(self, tie_word_embeddings=None):
        # test_tp_backward compares a TP and a single-process model in train mode: their dropout masks cannot match
        # (each rank draws its own for its shard), so the TP tests run without dropout, as the in-tree models that
        # transformers runs them for (Qwen2/3: no dropout) do.
        config = super()._get_tp_config(tie_word_embeddings=tie_word_embeddings)
        config.attention_dropout = config.hidden_dropout = 0.0
        return config

    def _skip_if_tp_distributed_not_enabled(self):
        # transformers runs its distributed TP tests only for an allowlist of in-tree model types (CI time); megahf's
        # models are what this suite is for, so they run here.
        pass


def distributed_entry(rank: int, world_size: int, port: int, module: str, name: str, args: tuple) -> None:
    """One rank of the shims' `run_distributed`: torchrun's environment, a gloo group, then `module.name(rank, *args)`.
    It lives here, not in the shim, so that a spawned process can import it before the tests package exists."""
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    package()
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
