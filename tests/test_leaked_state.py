"""The two ways one test can hide the `past_key_values` deprecation warning from a later test in the same process
(issue 22; leaked_state.py), each shown on MegatronGPT exactly as transformers' `test_bc_cache_name_forward` records
it, and the teardown check of tests/conftest.py seeing each one while a warning-state-neutral test passes it."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache

import leaked_state
from megahf import MegatronGPTConfig, MegatronGPTForCausalLM

DEPRECATION = "`past_key_values` is deprecated"


@pytest.fixture(scope="module")
def model() -> MegatronGPTForCausalLM:
    torch.manual_seed(0)
    config = MegatronGPTConfig.from_preset("gpt-tiny", vocab_size=99, hidden_size=32, num_layers=1,
                                           num_attention_heads=4)
    return MegatronGPTForCausalLM(config).eval()


def call_with_old_name(model) -> None:
    model(torch.tensor([[3, 5, 7]]), past_key_values=DynamicCache(config=model.config), use_cache=True)


def recorded(model) -> list[str]:
    """What transformers' test does: one call with the old name inside `catch_warnings(record=True)`."""
    with warnings.catch_warnings(record=True) as caught:
        call_with_old_name(model)
    return [str(w.message) for w in caught if DEPRECATION in str(w.message)]


def _suspended_inside_catch_warnings():
    with warnings.catch_warnings():
        yield


def test_the_warning_is_recorded_when_nothing_leaked(model):
    before = leaked_state.snapshot()
    assert len(recorded(model)) == 1
    assert leaked_state.leaks_since(before) == []


def test_an_open_catch_warnings_closed_later_sends_the_warning_astray(model):
    # Outer recorder: the state a stale context puts back (here it catches what the test below loses).
    with warnings.catch_warnings(record=True) as astray:
        before = leaked_state.snapshot()
        leaked = _suspended_inside_catch_warnings()
        next(leaked)  # an earlier test leaves this generator suspended inside its `with` block
        assert len(leaked_state.leaks_since(before)) == 1, "the teardown check must see the open context"
        with warnings.catch_warnings(record=True) as caught:
            leaked.close()  # what the garbage collector does to it, at whatever moment it runs
            call_with_old_name(model)
        assert not any(DEPRECATION in str(w.message) for w in caught), "the block was expected to miss the warning"
        assert sum(DEPRECATION in str(w.message) for w in astray) == 1, "the warning went to the restored recorder"


def test_a_compile_flag_left_set_silences_the_warning(model, monkeypatch):
    before = leaked_state.snapshot()
    # `torch.compiler.is_compiling()` reads this one process-wide flag (torch 2.13); Dynamo holds it for a whole
    # compile session and torch.export for an export, whichever thread runs them.
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert torch.compiler.is_compiling()
    assert recorded(model) == []
    leaks = leaked_state.leaks_since(before)
    assert len(leaks) == 1 and leaks[0].startswith("torch.compiler.is_compiling() went from False to True"), leaks
    monkeypatch.undo()
    assert leaked_state.leaks_since(before) == []
