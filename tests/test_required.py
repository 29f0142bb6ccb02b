"""tests/required.py: a missing oracle skips outside scripts/test.sh and fails inside it."""

import sys

import pytest

import required


def test_a_missing_oracle_fails_under_scripts_test_sh(monkeypatch):
    monkeypatch.setattr(required, "STRICT", True)
    with pytest.raises(pytest.fail.Exception, match="no_such_oracle.*setup_env.sh"):
        required.oracle("no_such_oracle")


def test_a_missing_oracle_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(required, "STRICT", False)
    with pytest.raises(pytest.skip.Exception, match="no_such_oracle"):
        required.oracle("no_such_oracle")


def test_a_present_oracle_is_the_module():
    assert required.oracle("json") is __import__("json")


def test_a_missing_engine_names_its_own_install_step(monkeypatch):
    """Ray (the extended tier's engine) comes from another requirements file: the failure names that one."""
    monkeypatch.setattr(required, "STRICT", True)
    monkeypatch.setitem(sys.modules, "no_such_engine", None)
    with pytest.raises(pytest.fail.Exception, match="no_such_engine.*requirements-extended.txt"):
        required.oracle("no_such_engine", "MEGAHF_EXTENDED_TESTS=1 bash scripts/setup_env.sh installs "
                                          "scripts/requirements-extended.txt")
