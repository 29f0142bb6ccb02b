"""A Hub stand-in for the tests: the HTTP calls huggingface_hub 2.4 makes to create a model repo, a branch, commit
files (regular and LFS) and download them again, answered from memory. Standard library only.

    server = HubServer(); server.start()      # http://127.0.0.1:PORT, use it as HF_ENDPOINT (HF_HUB_DISABLE_XET=1)
    server.fail("POST", "/commit/", status=500, times=3)    # the next 3 matching requests get a 500
    server.fail("POST", "/commit/", drop=True)               # ... or a closed connection, no response at all
    server.requests                                          # every request: (method, path, status)

It keeps what a test needs to check a push: which files each commit added (`commits`), which LFS objects were
uploaded (`lfs_uploads`), and the Authorization headers it saw. A 500 response echoes the Authorization header it
received, as a careless server might, so that a test can check the client never prints it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".png", ".parquet")  # stored as LFS, as the Hub's .gitattributes
ZERO_SHA = "0" * 40


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs_sha256: str | None  # None: a regular (git) file

    @property
    def oid(self) -> str:
        """What the Hub's preupload and tree report: sha256 for LFS files, the git blob sha1 otherwise."""
        return self.lfs_sha256 or git_blob_sha1(self.data)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # commit id -> path -> file

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class Failure:
    method: str
    path_pattern: str
    status: int
    drop: bool
    delay_s: float
    times: int


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_uploads: list[str] = []  # sha256 of every LFS object PUT
        self.commits: list[dict] = []  # {"repo", "revision", "added": [paths], "deleted": [paths], "message"}
        self.requests: list[tuple[str, str, int]] = []
        self.authorizations: set[str] = set()
        self.failures: list[Failure] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, method: str, path_pattern: str, status: int = 500, times: int = 1, drop: bool = False,
             delay_s: float = 0.0) -> None:
        """Make the next `times` requests whose method matches and whose path contains a match of `path_pattern`
        fail: with `status`, or (`drop`) by closing the connection without a response, after `delay_s`."""
        with self.lock:
            self.failures.append(Failure(method, path_pattern, status, drop, delay_s, times))

    def count(self, method: str, path_pattern: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and re.search(path_pattern, p))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {path: f.data for path, f in repo.commits[repo.resolve(revision)].items()}

    def _take_failure(self, method: str, path: str) -> Failure | None:
        with self.lock:
            for failure in self.failures:
                if failure.method == method and re.search(failure.path_pattern, path) and failure.times > 0:
                    failure.times -= 1
                    return failure
        return None


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None,
              head: bool = False) -> None:
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            if payload is not None:
                self.send_header("Content-Type", "application/json")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a timeout test)
            self.close_connection = True
        with self.hub.lock:
            self.hub.requests.append((self.command, urlsplit(self.path).path, status))

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._send(status, {"error": message}, headers={"X-Error-Code": code} if code else None)

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        if self.headers.get("Authorization"):
            self.hub.authorizations.add(self.headers["Authorization"])
        body = self._body() if self.command in ("POST", "PUT") else b""
        failure = self.hub._take_failure(self.command, path)
        if failure is not None:
            time.sleep(failure.delay_s)
            if failure.drop:
                with self.hub.lock:
                    self.hub.requests.append((self.command, path, 0))
                self.close_connection = True
                self.connection.shutdown(2)  # no response at all
                return
            self._send(failure.status, {"error": f"injected failure (request carried "
                                                 f"{self.headers.get('Authorization')})"})
            return
        for method, pattern, handler in _ROUTES:
            if method == self.command and (match := re.fullmatch(pattern, path)):
                return handler(self, body, *[unquote(g) for g in match.groups()])
        self._error(404, f"the stand-in does not serve {self.command} {path}", "EntryNotFound")

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str | None:
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ repos and branches
    def create_repo(self, body: bytes) -> None:
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
            first = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
            repo.commits[first] = {".gitattributes": StoredFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                                                                None)}
            repo.branches["main"] = first
            self.hub.repos[repo_id] = repo
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def create_branch(self, body: bytes, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        with self.hub.lock:
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: refs/heads/{branch}")
            commit = self._commit_of(repo, start)
            if commit is None:
                return
            repo.branches[branch] = commit
        self._send(200, {})

    def validate_yaml(self, body: bytes) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def repo_info(self, body: bytes, repo_id: str, revision: str | None = None) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = self._commit_of(repo, revision or "main")
        if commit is None:
            return
        files = repo.commits[commit]
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                         "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0,
                         "likes": 0})

    # ------------------------------------------------------------------ upload
    def preupload(self, body: bytes, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = repo.resolve(revision)
        current = repo.commits[commit] if commit else {}
        answer = []
        for entry in json.loads(body)["files"]:
            path = entry["path"]
            lfs = path.endswith(LFS_SUFFIXES) or entry["size"] > 10_000_000
            existing = current.get(path)
            answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": existing.oid if existing else None})
        self._send(200, {"files": answer, "commitOid": commit})

    def lfs_batch(self, body: bytes, repo_id: str) -> None:
        if self._repo(repo_id) is None:
            return
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 mismatch")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = body
            self.hub.lfs_uploads.append(oid)
        self._send(200, {})

    def commit(self, body: bytes, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        added, deleted = [], []
        with self.hub.lock:
            parent = self._commit_of(repo, revision)
            if parent is None:
                return
            files = dict(repo.commits[parent])
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]), None)
                    added.append(value["path"])
                elif key == "lfsFile":
                    if value["oid"] not in self.hub.lfs_objects:
                        return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = StoredFile(self.hub.lfs_objects[value["oid"]], value["oid"])
                    added.append(value["path"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                    deleted.append(value["path"])
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(prefix)]:
                        del files[path]
                        deleted.append(path)
            commit = hashlib.sha1(f"{parent} {header.get('summary')} {sorted(added)} {sorted(deleted)} "
                                  f"{len(repo.commits)}".encode()).hexdigest()
            repo.commits[commit] = files
            repo.branches[unquote(revision)] = commit
            self.hub.commits.append({"repo": repo_id, "revision": unquote(revision), "added": added,
                                     "deleted": deleted, "message": header.get("summary")})
        self._send(200, {"commitOid": commit, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit}",
                         "pullRequestUrl": None})

    # ------------------------------------------------------------------ download
    def _tree_entry(self, path: str, stored: StoredFile) -> dict:
        entry = {"type": "file", "path": path, "size": len(stored.data), "oid": git_blob_sha1(stored.data)}
        if stored.lfs_sha256:
            entry["lfs"] = {"oid": stored.lfs_sha256, "size": len(stored.data), "pointerSize": 130}
        return entry

    def tree(self, body: bytes, repo_id: str, revision: str, folder: str | None = None) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = self._commit_of(repo, revision)
        if commit is None:
            return
        recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["false"])[0].lower() == "true"
        prefix = (folder.strip("/") + "/") if folder else ""
        entries, folders = [], set()
        for path, stored in sorted(repo.commits[commit].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append(self._tree_entry(path, stored))
        if folder and not entries and not folders:
            return self._error(404, f"{folder} does not exist at {revision}", "EntryNotFound")
        entries += [{"type": "directory", "path": f, "oid": ZERO_SHA, "size": 0} for f in sorted(folders)]
        self._send(200, entries)

    def paths_info(self, body: bytes, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = self._commit_of(repo, revision)
        if commit is None:
            return
        paths = parse_qs(body.decode()).get("paths", [])
        if not paths and body.startswith(b"{"):
            paths = json.loads(body).get("paths", [])
        files = repo.commits[commit]
        self._send(200, [self._tree_entry(p, files[p]) for p in paths if p in files])

    def resolve(self, body: bytes, repo_id: str, revision: str, path: str) -> None:
        head = self.command == "HEAD"
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._send(404, {"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"},
                              head=head)
        commit = repo.resolve(revision)
        if commit is None:
            return self._send(404, {"error": "Invalid rev id"}, headers={"X-Error-Code": "RevisionNotFound"},
                              head=head)
        stored = repo.commits[commit].get(path)
        if stored is None:
            return self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"},
                              head=head)
        etag = f'"{stored.lfs_sha256 or git_blob_sha1(stored.data)}"'
        headers = {"X-Repo-Commit": commit, "ETag": etag, "Accept-Ranges": "bytes"}
        if stored.lfs_sha256:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(stored.data))})
        self._send(200, headers=headers, body=stored.data, head=head)


_REPO = r"([^/]+/[^/]+)"
_ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/branch/(.+)", _Handler.create_branch),
    ("POST", rf"/api/models/{_REPO}/preupload/([^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/([^/]+)", _Handler.commit),
    ("POST", rf"/api/models/{_REPO}/paths-info/([^/]+)", _Handler.paths_info),
    ("GET", rf"/api/models/{_REPO}", _Handler.repo_info),
    ("GET", rf"/api/models/{_REPO}/revision/([^/]+)", _Handler.repo_info),
    ("GET", rf"/api/models/{_REPO}/tree/([^/]+)", _Handler.tree),
    ("GET", rf"/api/models/{_REPO}/tree/([^/]+)/(.+)", _Handler.tree),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/lfs-upload/([0-9a-f]{64})", _Handler.lfs_put),
    ("GET", rf"/{_REPO}/resolve/([^/]+)/(.+)", _Handler.resolve),
    ("HEAD", rf"/{_REPO}/resolve/([^/]+)/(.+)", _Handler.resolve),
]
