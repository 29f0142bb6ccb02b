"""A push against a failing Hub: 5xx answers and dropped connections are retried (a bounded number of times, with
back-off), then end in one clear HubError; other errors are not retried; the local folder is never touched and the
token (which the stand-in's 500 answers echo back) never appears in what megahf prints or raises."""

from __future__ import annotations

import shutil
import socket

import pytest

from hub_helpers import FAKE_TOKEN, snapshot


def _push(folder, repo_id, hub, logs, **kwargs):
    from megahf.hub import push_folder

    return push_folder(folder, repo_id, endpoint=hub.url, say=logs.append, **kwargs)


def test_500s_are_retried_then_the_push_succeeds(online, models):
    hub, logs = online, []
    before = snapshot(models["gpt_run"])
    commits = hub.count("POST", r"/commit/")
    hub.fail("POST", r"/api/models/alice/retry-ok/commit/", status=500, times=2)
    result = _push(models["gpt_run"], "alice/retry-ok", hub, logs)
    assert result.tries == 3 and result.commit is not None
    assert hub.count("POST", r"/commit/") - commits == 3
    assert "README.md" in hub.files("alice/retry-ok")
    assert sum("retrying" in line for line in logs) == 2
    assert snapshot(models["gpt_run"]) == before
    assert FAKE_TOKEN not in "\n".join(logs)


def test_a_dropped_connection_mid_upload_is_retried(online, models):
    hub, logs = online, []
    hub.fail("POST", r"/api/models/alice/dropped/commit/", drop=True, times=1)
    result = _push(models["bert_dir"], "alice/dropped", hub, logs)
    assert result.tries == 2
    assert any(status == 0 and "/alice/dropped/commit/" in path for _, path, status in hub.requests)
    assert "model.safetensors" in hub.files("alice/dropped")


def test_a_hub_that_keeps_failing_ends_in_one_clear_error(online, models):
    from megahf.hub import HubError

    hub, logs = online, []
    before = snapshot(models["gpt_run"])
    hub.fail("POST", r"/api/models/alice/down/commit/", status=503, times=100)
    start = hub.count("POST", r"/alice/down/commit/")
    with pytest.raises(HubError) as caught:
        _push(models["gpt_run"], "alice/down", hub, logs, tries=4)
    message = str(caught.value)
    assert hub.count("POST", r"/alice/down/commit/") - start == 4
    assert "after 4 tries" in message and "503" in message and "nothing local was changed" in message
    assert "injected failure" in message  # the server's words reach the user ...
    assert FAKE_TOKEN not in message and FAKE_TOKEN not in "\n".join(logs)  # ... but not the token they echo
    assert "***" in message
    assert snapshot(models["gpt_run"]) == before
    assert hub.files("alice/down") .keys() == {".gitattributes"}  # nothing half-committed
    hub.failures.clear()


def test_a_refused_connection_is_retried_then_reported(online, models, monkeypatch):
    from megahf.hub import HubError, push_folder

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = []
    with pytest.raises(HubError, match=r"after 3 tries: .*(Connect|connect|refused)"):
        push_folder(models["bert_dir"], "alice/nowhere", endpoint=f"http://127.0.0.1:{port}", tries=3,
                    say=logs.append)
    assert sum("retrying" in line for line in logs) == 2


def test_a_refusal_is_not_retried(online, models):
    from megahf.hub import HubError

    hub, logs = online, []
    hub.fail("POST", r"/api/repos/create", status=403, times=1)
    with pytest.raises(HubError, match=r"403") as caught:
        _push(models["bert_dir"], "alice/forbidden", hub, logs)
    assert "after" not in str(caught.value) and not any("retrying" in line for line in logs)


def test_timeouts_and_transport_errors_count_as_transient():
    import httpx2
    from megahf.hub.push import _transient

    request = httpx2.Request("POST", "http://127.0.0.1/commit")
    assert _transient(httpx2.ReadTimeout("slow", request=request))
    assert _transient(httpx2.ConnectError("refused", request=request))
    assert _transient(httpx2.RemoteProtocolError("dropped", request=request))
    assert not _transient(ValueError("a bug"))


def test_bad_input_is_refused_before_any_request(online, models, tmp_path):
    from megahf.hub import HubError

    hub, logs = online, []
    requests = len(hub.requests)
    with pytest.raises(HubError, match=r"--repo-id 'no-slash' is not a Hub repo id"):
        _push(models["bert_dir"], "no-slash", hub, logs)
    with pytest.raises(HubError, match=r"holds no model"):
        _push(tmp_path, "alice/empty", hub, logs)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "megatron_gpt"}')
    (pickled / "model.safetensors").write_bytes(b"")
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(HubError, match=r"pytorch_model.bin is a pickle file"):
        _push(pickled, "alice/pickled", hub, logs)
    with pytest.raises(Exception, match=r"--max-shard-size 'huge' is not a size"):
        _push(models["bert_dir"], "alice/x", hub, logs, max_shard_size="huge")
    assert len(hub.requests) == requests


def test_no_token_or_offline_is_refused_up_front(online, models, monkeypatch, tmp_path):
    from huggingface_hub import constants
    from megahf.hub import HubError

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(HubError, match=r"no Hugging Face token: set HF_TOKEN"):
        _push(models["bert_dir"], "alice/anon", online, [])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE is set"):
        _push(models["bert_dir"], "alice/anon", online, [])


def test_the_command_line_push(hub, models, tmp_path):
    """`megahf push` as a user runs it: HF_ENDPOINT and HF_TOKEN from the environment; errors are one line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from hub_helpers import subprocess_env

    env = {**subprocess_env(hub, tmp_path / "home"), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    src = Path(__file__).resolve().parents[2] / "src"
    env["PYTHONPATH"] = f"{src}{os.pathsep}{env['PYTHONPATH']}"
    command = [sys.executable, "-m", "megahf", "push", str(models["bert_dir"]), "--repo-id", "alice/cli",
               "--revision", "b1", "--commit-message", "first push", "--private"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "config.json" in hub.files("alice/cli", "b1") and hub.repos["alice/cli"].private
    assert hub.commits[-1]["message"] == "first push" and hub.commits[-1]["revision"] == "b1"
    hub.fail("POST", r"/api/models/alice/cli/commit/", status=500, times=4)
    (tmp_path / "changed").mkdir()
    shutil.copytree(models["bert_dir"], tmp_path / "changed" / "m")
    (tmp_path / "changed" / "m" / "special_tokens_map.json").write_text("{}")
    failed = subprocess.run([*command[:4], str(tmp_path / "changed" / "m"), *command[5:]], env=env,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("megahf push: error: pushing") and "after 4 tries" in last
    for output in (done.stdout, done.stderr, failed.stdout, failed.stderr):
        assert FAKE_TOKEN not in output


def test_a_server_that_stalls_mid_upload_times_out_and_is_retried(online, models, monkeypatch):
    hub, logs = online, []
    # 2 s: far above what a request to the stand-in takes even on a loaded machine, far below the 8 s stall
    monkeypatch.setenv("MEGAHF_HUB_TIMEOUT", "2")
    hub.fail("POST", r"/api/models/alice/stalled/commit/", status=500, delay_s=8.0, times=1)  # answers too late
    result = _push(models["bert_dir"], "alice/stalled", hub, logs)
    assert result.tries >= 2 and result.commit is not None
    assert any("retrying" in line and "Timeout" in line for line in logs), logs
    from huggingface_hub.utils import _http

    assert _http._GLOBAL_CLIENT_FACTORY is _http.default_client_factory  # the timeout was for the push only


def test_a_bad_delay_setting_is_refused(online, models, monkeypatch):
    from megahf.hub import HubError

    monkeypatch.setenv("MEGAHF_HUB_TIMEOUT", "soon")
    with pytest.raises(HubError, match=r"MEGAHF_HUB_TIMEOUT='soon' is not a number of seconds"):
        _push(models["bert_dir"], "alice/never", online, [])
