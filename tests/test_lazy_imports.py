"""`megahf --help` starts without torch, and `import megahf` still registers the models with the Auto classes.

Each check runs in a fresh interpreter: what a process imported is read from `sys.modules` or from Python's own
import log (`PYTHONPROFILEIMPORTTIME`, which works for the console script too), never from a timing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("megahf"))


def imported_modules(cmd: list[str]) -> set[str]:
    """The modules a command's Python process imported, from its import log; the command must exit 0."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "PYTHONPROFILEIMPORTTIME": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout
    return {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("launcher", [[CONSOLE_SCRIPT], [sys.executable, "-m", "megahf"]], ids=["console", "python-m"])
@pytest.mark.parametrize("verb", [[], ["pretrain"], ["finetune"], ["preprocess"], ["evaluate"], ["evaluate", "lambada"],
                                  ["evaluate", "wikitext"], ["convert"], ["push"], ["card"], ["plan"]],
                         ids=["megahf", "pretrain", "finetune", "preprocess", "evaluate", "evaluate-lambada",
                              "evaluate-wikitext", "convert", "push", "card", "plan"])
def test_help_does_not_import_torch(launcher, verb):
    modules = imported_modules([*launcher, *verb, "--help"])
    assert "megahf.cli" in modules  # the log is read correctly
    assert not {"torch", "transformers"} & modules, sorted(m for m in modules if m.startswith(("torch", "transf")))


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_megahf_then_auto_classes_resolve_its_models():
    out = run_python("""
        import sys
        import megahf
        assert "torch" not in sys.modules
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForPreTraining
        config = AutoConfig.for_model("megatron_gpt", num_layers=1, hidden_size=32, num_attention_heads=2,
                                      vocab_size=64)
        assert type(config) is megahf.MegatronGPTConfig, type(config)
        assert type(AutoModelForCausalLM.from_config(config)) is megahf.MegatronGPTForCausalLM
        assert type(AutoModel.from_config(config)) is megahf.MegatronGPTModel
        bert = AutoConfig.for_model("megatron_bert", num_layers=1, hidden_size=32, num_attention_heads=2,
                                    vocab_size=64)
        assert type(AutoModelForPreTraining.from_config(bert)) is megahf.MegatronBertForPreTraining
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.parametrize("first", [
    "from megahf import MegatronGPTForCausalLM",  # megahf's models first: registration waits for their import
    "import transformers.modeling_utils; import megahf",  # transformers' Auto classes already loaded
    "import megahf.models.bert",  # a submodule directly
])
def test_registration_whatever_is_imported_first(first):
    out = run_python(f"""
        {first}
        import megahf
        from transformers import AutoConfig, AutoModelForMaskedLM
        from megahf import MegatronBertConfig, MegatronBertForMaskedLM, MegatronGPTConfig
        assert AutoConfig.for_model("megatron_gpt").__class__ is MegatronGPTConfig
        config = MegatronBertConfig(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=64)
        assert type(AutoModelForMaskedLM.from_config(config)) is MegatronBertForMaskedLM
        print("ok")
    """)
    assert out.strip() == "ok"


def test_import_megahf_silences_bitsandbytes_kernels_warning():
    """transformers' Trainer imports peft, which imports bitsandbytes, whose CPU backend warns at import that the Hub
    package `kernels` is missing (only on CPUs with AVX512-BF16). megahf silences that one logger; the control run
    without megahf shows the check can fail where the warning exists."""
    def stderr_of(code: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    assert "kernels-community" not in stderr_of("import megahf, bitsandbytes")
    control = stderr_of("import bitsandbytes.backends.cpu.ops as ops; import bitsandbytes; "
                        "print(bool(ops.has_avx512bf16()), file=__import__('sys').stderr)")
    if control.rstrip().endswith("True"):
        assert "kernels-community" in control
