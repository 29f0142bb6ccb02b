"""`megahf push FOLDER --repo-id USER/NAME`: one commit of the staged files to a Hub repo (created if missing),
on `main` or on a branch (created from main if missing).

Transient failures (a 5xx or 429 answer, a refused or dropped connection, a timeout) are retried with exponential
back-off, `tries` times in all (the delays start at `MEGAHF_HUB_RETRY_DELAY` seconds, default 2, and double), then
end in one `HubError`. A connection on which nothing moves for `MEGAHF_HUB_TIMEOUT` seconds (default 60) counts as a
timeout (huggingface_hub itself waits forever on an upload). A commit is all or nothing on the Hub, so a failed push leaves the repo as it was; FOLDER is
never written. Files whose content the repo already has at that revision are not uploaded again (the Hub's preupload
answer tells huggingface_hub so), and a push that changes nothing makes no commit. The token (HF_TOKEN or
`hf auth login`) is sent to the Hub only: it is removed from every message megahf prints or raises.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .folder import HUB_ID, HubError, read_folder
from .shards import parse_size
from .stage import DEFAULT_MAX_SHARD_SIZE, StageOptions, staged

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
DEFAULT_TRIES = 4


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit: str | None  # None: nothing changed, no commit made
    url: str
    uploaded: list[str]  # files sent in the commit (new or changed)
    unchanged: list[str]  # files the repo already had, not sent
    deleted: list[str]  # stale weight files removed from the repo
    tries: int


def check_repo_id(repo_id: str, where: str = "--repo-id") -> None:
    if not isinstance(repo_id, str) or not HUB_ID.match(repo_id):
        raise HubError(f"{where} {repo_id!r} is not a Hub repo id; write USER/NAME (or ORG/NAME), e.g. "
                       "alice/gpt-tiny-shakespeare")


def check_can_push() -> None:
    """Refuse, before any work, a push that cannot authenticate or is forbidden the network."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set: pushing to the Hub needs the network; run with HF_HUB_OFFLINE=0")
    if not get_token():
        raise HubError("no Hugging Face token: set HF_TOKEN (a token with write access) or run `hf auth login`")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, license: str = "apache-2.0", base_model: str | None = None,
                max_shard_size: str = DEFAULT_MAX_SHARD_SIZE, tries: int = DEFAULT_TRIES,
                retry_delay_s: float | None = None, endpoint: str | None = None,
                say: Callable[[str], None] = print) -> PushResult:
    """Publish `folder` (a run's output_dir, a model folder or a peft adapter folder) to `repo_id`."""
    check_repo_id(repo_id)
    if tries < 1:
        raise HubError(f"tries={tries}: a push needs at least 1 try")
    if base_model is not None:
        check_repo_id(base_model, "--base-model")
    max_bytes = parse_size(max_shard_size)
    source = read_folder(folder)
    check_can_push()
    from huggingface_hub import HfApi, get_token

    token = get_token()
    api = HfApi(endpoint=endpoint, token=token)
    branch = revision or "main"
    delay = _env_seconds("MEGAHF_HUB_RETRY_DELAY", 2.0) if retry_delay_s is None else retry_delay_s
    stall = _env_seconds("MEGAHF_HUB_TIMEOUT", 60.0)
    message = commit_message or f"megahf push {Path(folder).name}"
    options = StageOptions(repo_id=repo_id, revision=branch, license=license, base_model=base_model,
                           max_shard_bytes=max_bytes)
    with staged(source, options) as stage, _stall_timeout(stall):
        say(f"pushing {len(stage.files)} files from {folder} to {repo_id}@{branch} ({api.endpoint})")
        for attempt in range(1, tries + 1):
            try:
                result = _push_once(api, repo_id, branch, private, message, stage)
                result.tries = attempt
                break
            except Exception as error:  # noqa: BLE001 - sorted into transient (retried) and final below
                if not _transient(error) and not _hub_answer(error):
                    raise  # not the Hub's doing: a bug, with its traceback
                text = _redact(_one_line(error), token)
                if not _transient(error):
                    raise HubError(f"pushing {folder} to {repo_id}@{branch} failed: {text}; nothing local was "
                                   "changed") from None
                if attempt == tries:
                    raise HubError(
                        f"pushing {folder} to {repo_id}@{branch} failed after {tries} tries: {text}; nothing local "
                        "was changed and the repo keeps its previous commit (a commit is all or nothing); run the "
                        "same command again when the Hub answers"
                    ) from None
                wait = delay * 2 ** (attempt - 1)
                say(f"try {attempt}/{tries} failed ({text}); retrying in {wait:g}s")
                time.sleep(wait)
    if result.commit is None:
        say(f"nothing to push: {repo_id}@{branch} already has these {len(result.unchanged)} files")
    else:
        say(f"pushed {len(result.uploaded)} files ({len(result.unchanged)} unchanged"
            f"{f', {len(result.deleted)} stale deleted' if result.deleted else ''}) to {result.url} "
            f"(revision {branch}, commit {result.commit[:12]})")
    return result


def _push_once(api, repo_id: str, branch: str, private: bool, message: str, stage) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    if branch != "main":
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    before = api.repo_info(repo_id, revision=branch).sha
    existing = api.list_repo_files(repo_id, revision=branch)
    stale = [f for f in existing if f.endswith((".safetensors", ".safetensors.index.json"))
             and f not in stage.files and "/" not in f]
    additions = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in
                 stage.files.items()]
    operations = [*additions, *[CommitOperationDelete(path_in_repo=f) for f in stale]]
    info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=branch)
    # create_commit compares each file's hash with the one preupload reported (huggingface_hub 2.4 keeps both on the
    # operation) and leaves out the equal ones; read which, for the report
    unchanged = [op.path_in_repo for op in additions
                 if getattr(op, "_remote_oid", None) is not None and op._remote_oid == op._local_oid]
    uploaded = [op.path_in_repo for op in additions if op.path_in_repo not in set(unchanged)]
    commit = info.oid if info.oid != before else None
    return PushResult(repo_id, branch, commit, str(repo_url), uploaded if commit else [], unchanged,
                      stale if commit else [], 0)


@contextlib.contextmanager
def _stall_timeout(seconds: float) -> Iterator[None]:
    """Give huggingface_hub's shared HTTP client a per-operation timeout (connect, and each read or write: a slow
    but moving upload is never cut) for the duration of a push. huggingface_hub 2.4 builds its client with
    `timeout=None`, so a server that stops answering mid-upload would hang the push forever; remove this once it has a
    default upload timeout."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    previous = _http._GLOBAL_CLIENT_FACTORY

    def factory():
        client = previous()
        client.timeout = httpx2.Timeout(seconds)
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


def _transient(error: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code in RETRY_STATUSES
    return isinstance(error, (httpx2.TransportError, TimeoutError, ConnectionError))


def _hub_answer(error: BaseException) -> bool:
    """An error answer of the Hub (401, 403, 404, 409, 422, ...), reported as such, not retried."""
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(error, HfHubHTTPError)


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise HubError(f"{name}={text!r} is not a number of seconds; set e.g. {name}={default:g} or unset it")
    return value


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


__all__ = ["PushResult", "check_can_push", "check_repo_id", "push_folder"]
