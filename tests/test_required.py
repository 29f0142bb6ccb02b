"""tests/required.py: a missing oracle skips outside scripts/test.sh and fails inside it."""

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
