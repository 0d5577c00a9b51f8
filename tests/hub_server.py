"""A small in-memory Hugging Face Hub that the *real* `huggingface_hub` client can talk to.

Why: tests must exercise the actual client (its URLs, payloads, error mapping, cache layout) without the
internet and without mocking it. Point the client at this server with `HF_ENDPOINT=http://127.0.0.1:PORT`
and `HF_HUB_DISABLE_XET=1` (so uploads take the LFS "basic" path instead of Xet).

What is implemented (the subset huggingface_hub 2.x uses for create/upload/download/list):
  GET  /api/whoami-v2
  POST /api/repos/create                                   (409 when the repo exists)
  POST /api/validate-yaml                                  (README.md front matter)
  GET  /api/{models|datasets}/{repo}[/revision/{rev}]      (?blobs=true adds sizes + LFS info to siblings)
  GET  /api/{models|datasets}?filter=..&author=..&search=..
  POST /api/{type}s/{repo}/preupload/{rev}                 (lfs vs regular upload mode, remote oids)
  POST /{[datasets/]}{repo}.git/info/lfs/objects/batch     (basic transfer: pre-signed PUT + verify)
  PUT  /_lfs/upload/{oid}?sig=..   POST /_lfs/verify
  POST /api/{type}s/{repo}/commit/{rev}[?create_pr=1]      (NDJSON: header, file, lfsFile, deletedFile, deletedFolder)
  POST|DELETE /api/{type}s/{repo}/branch/{branch}
  GET  /api/{type}s/{repo}/refs
  GET  /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=&expand=
  POST /api/{type}s/{repo}/paths-info/{rev}                (form: paths=..&expand=..)
  HEAD|GET /{[datasets/]}{repo}/resolve/{rev}/{path}       (ETag, X-Repo-Commit, X-Linked-Etag/Size, Range)
  Spaces (repo type "space", URL prefix spaces/): create with an sdk (and hardware, secrets, variables), info
  with `sdk` and `runtime`, POST|DELETE /api/spaces/{repo}/secrets, GET /api/spaces/{repo}/runtime,
  POST /api/spaces/{repo}/hardware; `Repo.secrets` holds what was set (values never leave the server).

Storage: every commit is an immutable snapshot {path: File}; branches (and refs/pr/N) point at commits; a
commit is applied under one lock and only becomes visible when all its operations are valid (an `lfsFile`
whose object was never uploaded rejects the whole commit).

Errors follow the Hub's conventions so the client raises its typed errors: `X-Error-Code: RepoNotFound |
RevisionNotFound | EntryNotFound | GatedRepo` and `X-Error-Message`. Note the client only maps a bare 401 to
RepositoryNotFoundError for https URLs, so this server always sends the error code header.

Failure injection (attributes/methods on `FakeHub`):
  drop_lfs_put(nth=1, times=None)   close the socket mid-body on the nth LFS PUT (and the next `times-1`;
                                    None = every later PUT too, so the client's retries fail as well)
  corrupt(path, repo_id=None)       serve that file's bytes with one byte flipped (same length) on GET
  fail(path, status=500, times=None, method=None)
                                    answer `status` for a repo file path (resolve) or, when `path` starts
                                    with "/", for any URL path starting with it
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_TOKEN = "hf_testtoken_0123456789abcdefghijklmnop"
DEFAULT_USER = "tester"

# The .gitattributes the Hub puts in every new repo (shortened): these paths are stored with LFS.
LFS_PATTERNS = [
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.h5", "*.msgpack", "*.onnx",
    "*.gguf", "*.npy", "*.npz", "*.zip", "*.tar.*", "*.gz", "*.arrow", "*.parquet", "*tfevents*",
]
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
REGULAR_MAX_SIZE = 10 * 1024 * 1024
SUBPATHS = {
    "revision", "tree", "preupload", "commit", "commits", "branch", "tag", "refs", "paths-info", "resolve",
    "discussions", "settings", "safetensors-metadata", "lfs-files", "super-squash", "secrets", "runtime",
    "hardware",
}
SPACE_SDKS = ("gradio", "streamlit", "docker", "static")
_EXPAND_FILTERS = {"library": "library_name", "pipeline_tag": "pipeline_tag"}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub calls `oid` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class File:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        """Git oid: of the pointer file for LFS files (as on the Hub), of the content otherwise."""
        return git_blob_sha1(lfs_pointer(self.sha256, len(self.data))) if self.lfs else git_blob_sha1(self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_sha1(self.data)


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    files: dict  # path -> File (never mutated after creation)
    title: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool = False
    granted: set = field(default_factory=set)  # users allowed through the gate
    commits: dict = field(default_factory=dict)  # sha -> Commit
    refs: dict = field(default_factory=dict)  # "main" / "dev" / "refs/pr/1" -> sha
    pr_count: int = 0
    created_at: str = field(default_factory=_now)
    sdk: str | None = None  # Spaces only
    hardware: str = "cpu-basic"  # Spaces: the requested flavour
    secrets: dict = field(default_factory=dict)  # Spaces: key -> value
    variables: dict = field(default_factory=dict)  # Spaces: key -> value

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0] if "/" in self.repo_id else ""

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.refs:
            return self.commits[self.refs[rev]]
        if rev.startswith("refs/heads/") and rev[len("refs/heads/"):] in self.refs:
            return self.commits[self.refs[rev[len("refs/heads/"):]]]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in self.commits:
            return self.commits[rev]
        return None


class HubHTTPError(Exception):
    """Raised inside a handler to answer with an error response."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def _card_data(readme: bytes | None) -> dict:
    if not readme:
        return {}
    text = readme.decode("utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        import yaml

        data = yaml.safe_load(m.group(1))
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def _space_card_problems(data: dict) -> list:
    """The Space configuration rules the Hub enforces on a README's front matter (the subset tests rely on)."""
    problems = []
    if data.get("sdk") not in SPACE_SDKS:
        problems.append(f'"sdk" must be one of {", ".join(SPACE_SDKS)}')
    if data.get("sdk") in ("gradio", "streamlit") and not isinstance(data.get("sdk_version"), str):
        problems.append('"sdk_version" must be a version string')
    for key in ("app_file", "title", "short_description", "suggested_hardware", "license"):
        if key in data and not isinstance(data[key], str):
            problems.append(f'"{key}" must be a string')
    if len(str(data.get("short_description") or "")) > 60:
        problems.append('"short_description" must be at most 60 characters')
    for key in ("models", "datasets", "tags"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(v, str) for v in data[key])):
            problems.append(f'"{key}" must be a list of strings')
    return problems


class FakeHub:
    """The server object tests hold: repos, tokens, failure knobs and a request log."""

    def __init__(self, tokens: dict | None = None, orgs: dict | None = None):
        # token -> {"user": name, "role": "write" | "read"}
        self.tokens: dict = tokens or {DEFAULT_TOKEN: {"user": DEFAULT_USER, "role": "write"}}
        self.orgs: dict = orgs or {}  # user -> set of org names
        self.repos: dict = {}  # (repo_type, repo_id) -> Repo
        self.lfs_objects: dict = {}  # sha256 -> bytes (uploaded, not necessarily committed)
        self.requests: list = []  # (method, path, authenticated) — never the token itself
        self.lock = threading.RLock()
        self._counter = 0
        self._signatures: dict = {}  # sig -> (oid, size)
        # failure knobs
        self._drop_from: int | None = None
        self._drop_times: int | None = None
        self.lfs_put_attempts = 0
        self.dropped_puts = 0
        self.injected: list[dict] = []  # every injected failure served: method, path, status (`fail`)
        self._corrupt: set = set()  # (repo_id or None, path)
        self._fail: list = []  # dicts: path, status, times, method
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # a short poll interval: shutdown() waits for it, once per test
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---------------------------------------------------------------- failure knobs
    def drop_lfs_put(self, nth: int = 1, times: int | None = None) -> None:
        """Close the connection mid-upload on the nth LFS PUT attempt (counted from now)."""
        with self.lock:
            self._drop_from = self.lfs_put_attempts + nth
            self._drop_times = times

    def corrupt(self, path: str, repo_id: str | None = None) -> None:
        with self.lock:
            self._corrupt.add((repo_id, path))

    def fail(self, path: str, status: int = 500, times: int | None = None, method: str | None = None) -> None:
        with self.lock:
            self._fail.append({"path": path, "status": status, "times": times, "method": method})

    def clear_failures(self) -> None:
        with self.lock:
            self._drop_from = self._drop_times = None
            self._corrupt.clear()
            self._fail.clear()

    # ---------------------------------------------------------------- direct (test-side) access
    def add_repo(
        self,
        repo_id: str,
        files: dict | None = None,
        *,
        repo_type: str = "model",
        private: bool = False,
        gated: bool = False,
        granted: set | None = None,
        branch: str = "main",
        sdk: str | None = None,
    ) -> Repo:
        """Create a repo (with the Hub's initial .gitattributes commit) and optionally commit `files`. A Space
        gets `sdk` (gradio unless given)."""
        with self.lock:
            repo = self._create_repo(repo_type, repo_id, private=private)
            repo.sdk = sdk or ("gradio" if repo_type == "space" else None)
            repo.gated = gated
            repo.granted = set(granted or ())
            if files:
                self.commit_files(repo_id, files, repo_type=repo_type, branch=branch)
            return repo

    def commit_files(self, repo_id: str, files: dict, *, repo_type: str = "model", branch: str = "main",
                     delete: list | None = None, title: str = "test commit") -> str:
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            head = repo.resolve(branch) or repo.commits[repo.refs["main"]]
            new = dict(head.files)
            for path, data in files.items():
                data = data.encode() if isinstance(data, str) else bytes(data)
                new[path] = File(data, lfs=self._is_lfs_path(path, data))
            for path in delete or []:
                new.pop(path, None)
            commit = self._new_commit(repo, head.sha, new, title)
            repo.refs[branch] = commit.sha
            return commit.sha

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list:
        with self.lock:
            commit = self.repo(repo_id, repo_type).resolve(revision)
            return sorted(commit.files) if commit else []

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self.lock:
            return self.repo(repo_id, repo_type).resolve(revision).files[path].data

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self.lock:
            return self.repo(repo_id, repo_type).resolve(revision).sha

    def paths_requested(self, method: str | None = None) -> list:
        return [p for m, p, _ in list(self.requests) if method is None or m == method]

    # ---------------------------------------------------------------- internals
    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private)
        first = self._new_commit(repo, None, {".gitattributes": File(GITATTRIBUTES, lfs=False)}, "initial commit")
        repo.refs["main"] = first.sha
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def _new_commit(self, repo: Repo, parent: str | None, files: dict, title: str) -> Commit:
        self._counter += 1
        h = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{title}\0{self._counter}\0{time.time_ns()}".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + files[path].etag.encode())
        commit = Commit(sha=h.hexdigest(), parent=parent, files=dict(files), title=title, date=_now())
        repo.commits[commit.sha] = commit
        return commit

    @staticmethod
    def _is_lfs_path(path: str, data_or_sample: bytes, size: int | None = None) -> bool:
        name = path.rsplit("/", 1)[-1]
        size = len(data_or_sample) if size is None else size
        if any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS):
            return True
        return size > REGULAR_MAX_SIZE or b"\0" in data_or_sample[:512]

    def _user(self, token: str | None) -> dict | None:
        return self.tokens.get(token) if token else None

    def _can_write(self, user: dict | None, namespace: str) -> bool:
        if user is None or user.get("role") != "write":
            return False
        return namespace == user["user"] or namespace in self.orgs.get(user["user"], set())

    def _can_read(self, user: dict | None, repo: Repo) -> bool:
        if not repo.private:
            return True
        return user is not None and (
            repo.namespace == user["user"] or repo.namespace in self.orgs.get(user["user"], set())
        )


def read_request_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body, whether sent with Content-Length or chunked (both clients use either)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            n = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if n == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += handler.rfile.read(n)
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


class _Handler(BaseHTTPRequestHandler):
    """One request. `fake` is the FakeHub (set on a per-server subclass)."""

    fake: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    # Headers and body go out in two writes; with Nagle's algorithm the body then waits for the client's delayed
    # ACK (40 ms on Linux) on every keep-alive response.
    disable_nagle_algorithm = True

    # silence the default stderr logging
    def log_message(self, format, *args):  # noqa: A002
        pass

    # ---------------------------------------------------------------- plumbing
    def _read_body(self) -> bytes:
        return read_request_body(self)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json",
              head_only: bool = False, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("X-Request-Id", secrets.token_hex(8))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head_only: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers, head_only=head_only)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _user(self) -> dict | None:
        """The caller, or None when anonymous. An unknown token is a 401 (as on the Hub)."""
        token = self._token()
        if token is None:
            return None
        user = self.fake._user(token)
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        raw_path, query = split.path, parse_qs(split.query, keep_blank_values=True)
        self._query = query
        try:
            body = b"" if method in ("GET", "HEAD") else self._read_body_for(method, raw_path)
        except _Dropped:
            return
        with self.fake.lock:
            self.fake.requests.append((method, unquote(raw_path), self._token() is not None))
        head_only = method == "HEAD"
        try:
            self._maybe_fail(method, unquote(raw_path), None)
            self._route(method, raw_path, body, head_only)
        except HubHTTPError as e:
            headers = dict(e.headers)
            headers["X-Error-Message"] = e.message
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message}, headers, head_only=head_only)
        except _Dropped:
            return

    def _read_body_for(self, method: str, raw_path: str) -> bytes:
        """Reads the body, or drops the connection halfway for an LFS PUT chosen by `drop_lfs_put`."""
        if method == "PUT" and raw_path.startswith("/_lfs/upload/"):
            fake = self.fake
            with fake.lock:
                fake.lfs_put_attempts += 1
                n = fake.lfs_put_attempts
                drop = fake._drop_from is not None and n >= fake._drop_from and (
                    fake._drop_times is None or n < fake._drop_from + fake._drop_times
                )
                if drop:
                    fake.dropped_puts += 1
            if drop:
                length = int(self.headers.get("Content-Length") or 0)
                if length > 1:
                    self.rfile.read(length // 2)
                else:
                    self.rfile.readline()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise _Dropped()
        return self._read_body()

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _maybe_fail(self, method: str, url_path: str, file_path: str | None) -> None:
        with self.fake.lock:
            for rule in self.fake._fail:
                if rule["method"] and rule["method"] != method:
                    continue
                target = rule["path"]
                hit = url_path.startswith(target) if target.startswith("/") else (file_path == target)
                if not hit:
                    continue
                if rule["times"] is not None:
                    if rule["times"] <= 0:
                        continue
                    rule["times"] -= 1
                self.fake.injected.append({"method": method, "path": file_path or url_path, "status": rule["status"]})
                raise HubHTTPError(rule["status"], f"injected failure {rule['status']}")

    # ---------------------------------------------------------------- routing
    def _route(self, method: str, raw_path: str, body: bytes, head_only: bool) -> None:
        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        if segs[:2] == ["api", "whoami-v2"]:
            return self._whoami()
        if segs[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(body)
        if segs[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(body)
        if segs[:2] == ["_lfs", "upload"] and method == "PUT":
            return self._lfs_put(segs[2], body)
        if segs[:2] == ["_lfs", "verify"] and method == "POST":
            return self._lfs_verify(body)
        if len(segs) >= 2 and segs[0] == "api" and segs[1] in ("models", "datasets", "spaces"):
            repo_type = segs[1][:-1]
            if len(segs) == 2:
                return self._list_repos(repo_type)
            return self._repo_api(method, repo_type, segs[2:], body)
        # git LFS batch: /{datasets/}ns/name.git/info/lfs/objects/batch
        if raw_path.endswith("/info/lfs/objects/batch") and method == "POST":
            repo_type, rest = self._repo_type_prefix(segs)
            repo_id = "/".join(rest[: rest.index("info")])
            if repo_id.endswith(".git"):
                repo_id = repo_id[:-4]
            return self._lfs_batch(repo_type, repo_id, body)
        if "resolve" in segs and method in ("GET", "HEAD"):
            repo_type, rest = self._repo_type_prefix(segs)
            i = rest.index("resolve")
            repo_id, tail = "/".join(rest[:i]), rest[i + 1:]
            rev, path_parts = self._split_rev(tail)
            return self._resolve(repo_type, repo_id, rev, "/".join(path_parts), head_only)
        raise HubHTTPError(404, f"no route for {method} {raw_path}")

    @staticmethod
    def _repo_type_prefix(segs: list) -> tuple:
        if segs and segs[0] in ("datasets", "spaces"):
            return segs[0][:-1], segs[1:]
        return "model", segs

    @staticmethod
    def _split_rev(tail: list) -> tuple:
        """A revision is one (quoted) segment, except an unquoted refs/pr/N or refs/heads/X."""
        if len(tail) >= 3 and tail[0] == "refs" and tail[1] in ("pr", "heads", "convert"):
            return "/".join(tail[:3]), tail[3:]
        return (tail[0] if tail else "main"), tail[1:]

    def _split_repo(self, repo_type: str, rest: list) -> tuple:
        """`ns/name/sub...` or the canonical single-segment `name/sub...`."""
        if len(rest) == 1 or (len(rest) >= 2 and rest[1] in SUBPATHS and (repo_type, rest[0]) in self.fake.repos):
            return rest[0], rest[1:]
        return f"{rest[0]}/{rest[1]}", rest[2:]

    def _get_repo(self, repo_type: str, repo_id: str, user: dict | None, *, write: bool = False) -> Repo:
        repo = self.fake.repos.get((repo_type, repo_id))
        if repo is None or not self.fake._can_read(user, repo):
            if user is None:
                raise HubHTTPError(401, "Invalid username or password.", "RepoNotFound")
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        if write and not self.fake._can_write(user, repo.namespace):
            raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _get_commit(repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _check_gate(self, repo: Repo, user: dict | None) -> None:
        if not repo.gated:
            return
        if user is not None and (user["user"] in repo.granted or repo.namespace == user["user"]):
            return
        msg = (f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated "
               "to access it. Please log in.")
        raise HubHTTPError(401 if user is None else 403, msg, "GatedRepo")

    def _base_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.fake.url}/{prefix}{repo_id}"

    # ---------------------------------------------------------------- endpoints
    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        orgs = [{"type": "org", "name": o} for o in sorted(self.fake.orgs.get(user["user"], ()))]
        self._json(200, {
            "type": "user", "id": hashlib.md5(user["user"].encode()).hexdigest()[:24], "name": user["user"],
            "fullname": user["user"].title(), "email": f"{user['user']}@example.test", "emailVerified": True,
            "canPay": False, "isPro": False, "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user.get("role", "write")}},
        })

    def _create_repo(self, body: bytes) -> None:
        user = self._user()
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to create a repo")
        payload = json.loads(body or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        namespace = org or user["user"]
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{name}"
        if not name or not re.fullmatch(r"[\w.-]+", name) or "--" in name:
            raise HubHTTPError(400, f"Invalid repo name {name!r}")
        if not self.fake._can_write(user, namespace):
            raise HubHTTPError(
                403, f"You don't have the rights to create a {repo_type} under the namespace {namespace}"
            )
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        if repo_type == "space" and payload.get("sdk") not in SPACE_SDKS:
            raise HubHTTPError(400, f"a Space needs an sdk, one of {', '.join(SPACE_SDKS)}")
        with self.fake.lock:
            if (repo_type, repo_id) in self.fake.repos:
                return self._json(409, {"error": f"You already created this {repo_type} repo",
                                        "url": self._base_url(repo_type, repo_id)})
            repo = self.fake._create_repo(repo_type, repo_id, private=private)
            if repo_type == "space":
                repo.sdk = payload["sdk"]
                repo.hardware = payload.get("hardware") or "cpu-basic"
                repo.secrets = {d["key"]: d["value"] for d in payload.get("secrets") or []}
                repo.variables = {d["key"]: d["value"] for d in payload.get("variables") or []}
        self._json(200, {"url": self._base_url(repo_type, repo_id), "name": repo_id, "id": secrets.token_hex(12)})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body or b"{}").get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if m:
            import yaml

            try:
                data = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                return self._json(400, {"errors": [{"message": f"Invalid YAML in README.md front matter: {e}"}]})
            if data is not None and not isinstance(data, dict):
                return self._json(400, {"errors": [{"message": "README.md front matter must be a YAML mapping"}]})
            if json.loads(body or b"{}").get("repoType") == "space":
                problems = _space_card_problems(data or {})
                if problems:
                    return self._json(400, {"errors": [{"message": p} for p in problems]})
        self._json(200, {"errors": [], "warnings": []})

    def _repo_summary(self, repo: Repo, commit: Commit, *, blobs: bool = False, full: bool = True) -> dict:
        card = _card_data(commit.files["README.md"].data if "README.md" in commit.files else None)
        tags = self._tags(card, commit)
        out = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.namespace or None, "sha": commit.sha, "lastModified": commit.date,
            "createdAt": repo.created_at, "private": repo.private, "gated": "manual" if repo.gated else False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": tags,
            "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
        }
        if repo.repo_type == "space":
            out.update(sdk=repo.sdk, subdomain=repo.repo_id.replace("/", "-").lower(), runtime=self._runtime(repo))
        if full:
            out["cardData"] = card or None
            siblings = []
            for path in sorted(commit.files):
                f = commit.files[path]
                sib = {"rfilename": path}
                if blobs:
                    sib.update(size=len(f.data), blobId=f.blob_id)
                    if f.lfs:
                        sib["lfs"] = {"sha256": f.sha256, "size": len(f.data),
                                      "pointerSize": len(lfs_pointer(f.sha256, len(f.data)))}
                siblings.append(sib)
            out["siblings"] = siblings
        return out

    @staticmethod
    def _tags(card: dict, commit: Commit) -> list:
        tags = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
        if card.get("library_name"):
            tags.append(card["library_name"])
        bases = card.get("base_model")
        bases = [bases] if isinstance(bases, str) else list(bases or [])
        relation = card.get("base_model_relation") or (
            "adapter" if "adapter_config.json" in commit.files else "finetune"
        )
        for b in bases:
            tags += [f"base_model:{b}", f"base_model:{relation}:{b}"]
        if card.get("license"):
            tags.append(f"license:{card['license']}")
        return list(dict.fromkeys(str(t) for t in tags))

    def _list_repos(self, repo_type: str) -> None:
        user = self._user()
        q = self._query
        filters = q.get("filter", [])
        author, search = (q.get("author") or [None])[0], (q.get("search") or [None])[0]
        limit = int((q.get("limit") or [0])[0] or 0)
        full = (q.get("full") or ["false"])[0].lower() in ("1", "true")
        out = []
        with self.fake.lock:
            for (rtype, repo_id), repo in sorted(self.fake.repos.items()):
                if rtype != repo_type or not self.fake._can_read(user, repo):
                    continue
                commit = repo.commits[repo.refs["main"]]
                summary = self._repo_summary(repo, commit, full=full)
                values = set(summary["tags"]) | {summary.get("library_name"), summary.get("pipeline_tag")}
                if any(f not in values for f in filters):
                    continue
                if author and repo.namespace != author:
                    continue
                if search and search.lower() not in repo_id.lower():
                    continue
                out.append(summary)
        self._json(200, out[:limit] if limit else out)

    def _repo_api(self, method: str, repo_type: str, rest: list, body: bytes) -> None:
        user = self._user()
        repo_id, sub = self._split_repo(repo_type, rest)
        action = sub[0] if sub else None
        with self.fake.lock:
            if action is None and method == "GET":
                repo = self._get_repo(repo_type, repo_id, user)
                return self._info(repo, "main")
            if action == "revision" and method == "GET":
                repo = self._get_repo(repo_type, repo_id, user)
                rev, _ = self._split_rev(sub[1:])
                return self._info(repo, rev)
            if action == "tree" and method == "GET":
                repo = self._get_repo(repo_type, repo_id, user)
                rev, path_parts = self._split_rev(sub[1:])
                return self._tree(repo, rev, "/".join(path_parts))
            if action == "paths-info" and method == "POST":
                repo = self._get_repo(repo_type, repo_id, user)
                rev, _ = self._split_rev(sub[1:])
                return self._paths_info(repo, rev, body)
            if action == "refs" and method == "GET":
                repo = self._get_repo(repo_type, repo_id, user)
                return self._refs(repo)
            if action == "preupload" and method == "POST":
                repo = self._get_repo(repo_type, repo_id, user, write=True)
                rev, _ = self._split_rev(sub[1:])
                return self._preupload(repo, rev, body)
            if action == "commit" and method == "POST":
                repo = self._get_repo(repo_type, repo_id, user, write=True)
                rev, _ = self._split_rev(sub[1:])
                return self._commit(repo, rev, body)
            if action == "secrets" and repo_type == "space" and method in ("POST", "DELETE"):
                repo = self._get_repo(repo_type, repo_id, user, write=True)
                payload = json.loads(body or b"{}")
                if method == "POST":
                    if not payload.get("key") or "value" not in payload:
                        raise HubHTTPError(400, "a secret needs a key and a value")
                    repo.secrets[payload["key"]] = payload["value"]
                else:
                    repo.secrets.pop(payload.get("key"), None)
                return self._json(200, {})
            if action == "runtime" and repo_type == "space" and method == "GET":
                return self._json(200, self._runtime(self._get_repo(repo_type, repo_id, user)))
            if action == "hardware" and repo_type == "space" and method == "POST":
                repo = self._get_repo(repo_type, repo_id, user, write=True)
                flavor = json.loads(body or b"{}").get("flavor")
                if not flavor:
                    raise HubHTTPError(400, "flavor is required")
                repo.hardware = flavor
                return self._json(200, self._runtime(repo))
            if action == "branch" and method in ("POST", "DELETE"):
                repo = self._get_repo(repo_type, repo_id, user, write=True)
                branch = "/".join(sub[1:])
                return self._branch(repo, branch, body, method)
        raise HubHTTPError(404, f"no route for {method} /api/{repo_type}s/{repo_id}/{'/'.join(sub)}")

    @staticmethod
    def _runtime(repo: Repo) -> dict:
        """A Space's runtime as the Hub reports it (this server builds nothing: always BUILDING)."""
        return {"stage": "BUILDING", "hardware": {"current": None, "requested": repo.hardware},
                "storage": None, "gcTimeout": None, "replicas": {"current": 1, "requested": 1}}

    def _info(self, repo: Repo, rev: str) -> None:
        commit = self._get_commit(repo, rev)
        blobs = (self._query.get("blobs") or ["false"])[0].lower() in ("1", "true")
        self._json(200, self._repo_summary(repo, commit, blobs=blobs))

    def _entry(self, path: str, f: File | None, commit: Commit, expand: bool) -> dict:
        if f is None:  # directory
            entry = {"type": "directory", "oid": hashlib.sha1(f"{commit.sha}:{path}".encode()).hexdigest(),
                     "size": 0, "path": path}
        else:
            entry = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data),
                                "pointerSize": len(lfs_pointer(f.sha256, len(f.data)))}
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
        return entry

    def _tree(self, repo: Repo, rev: str, prefix: str) -> None:
        commit = self._get_commit(repo, rev)
        recursive = (self._query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        expand = (self._query.get("expand") or ["false"])[0].lower() in ("1", "true")
        prefix = prefix.strip("/")
        if prefix and prefix in commit.files:
            raise HubHTTPError(400, f"{prefix} is a file, not a directory")
        base = prefix + "/" if prefix else ""
        files = {p: f for p, f in commit.files.items() if p.startswith(base)}
        if prefix and not files:
            raise HubHTTPError(404, f"{prefix} does not exist on {rev}", "EntryNotFound",
                               {"X-Repo-Commit": commit.sha})
        entries, dirs = [], set()
        for path in sorted(files):
            rel = path[len(base):].split("/")
            for i in range(1, len(rel)):
                dirs.add(base + "/".join(rel[:i]))
            if recursive or len(rel) == 1:
                entries.append(self._entry(path, files[path], commit, expand))
        for d in sorted(dirs):
            if recursive or "/" not in d[len(base):]:
                entries.append(self._entry(d, None, commit, expand))
        entries.sort(key=lambda e: (e["type"] != "directory", e["path"]))
        self._json(200, entries)

    def _paths_info(self, repo: Repo, rev: str, body: bytes) -> None:
        commit = self._get_commit(repo, rev)
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            form = json.loads(body or b"{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = (form.get("expand") or ["false"])[0].lower() in ("1", "true")
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(self._entry(p, commit.files[p], commit, expand))
            elif any(f.startswith(p + "/") for f in commit.files):
                out.append(self._entry(p, None, commit, expand))
        self._json(200, out)

    def _refs(self, repo: Repo) -> None:
        include_prs = (self._query.get("include_prs") or ["false"])[0].lower() in ("1", "true")
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                    for n, s in sorted(repo.refs.items()) if not n.startswith("refs/")]
        out = {"branches": branches, "converts": [], "tags": []}
        if include_prs:
            out["pullRequests"] = [{"name": n[len("refs/"):], "ref": n, "targetCommit": s}
                                   for n, s in sorted(repo.refs.items()) if n.startswith("refs/pr/")]
        self._json(200, out)

    def _preupload(self, repo: Repo, rev: str, body: bytes) -> None:
        commit = self._get_commit(repo, rev)
        payload = json.loads(body or b"{}")
        files = []
        for item in payload.get("files", []):
            path = item["path"]
            sample = base64.b64decode(item.get("sample") or "")
            lfs = self.fake._is_lfs_path(path, sample, size=int(item.get("size") or 0))
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if lfs else git_blob_sha1(existing.data)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        user = self._user()
        with self.fake.lock:
            repo = self._get_repo(repo_type, repo_id, user, write=True)
            payload = json.loads(body or b"{}")
            if payload.get("operation") != "upload":
                raise HubHTTPError(400, "only the upload operation is supported by this test hub")
            ref = (payload.get("ref") or {}).get("name")
            if ref is not None:
                self._get_commit(repo, ref)
            objects = []
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                entry = {"oid": oid, "size": size, "authenticated": True}
                if oid not in self.fake.lfs_objects:
                    sig = secrets.token_urlsafe(16)
                    self.fake._signatures[sig] = (oid, size)
                    entry["actions"] = {
                        "upload": {"href": f"{self.fake.url}/_lfs/upload/{oid}?sig={sig}", "expires_in": 86400},
                        "verify": {"href": f"{self.fake.url}/_lfs/verify", "expires_in": 86400},
                    }
                objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> None:
        sig = (self._query.get("sig") or [None])[0]
        with self.fake.lock:
            expected = self.fake._signatures.get(sig)
            if expected is None or expected[0] != oid:
                raise HubHTTPError(403, "invalid or expired upload signature")
            if len(body) != expected[1] or hashlib.sha256(body).hexdigest() != oid:
                raise HubHTTPError(400, "uploaded content does not match the announced oid/size")
            self.fake.lfs_objects[oid] = body
        self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_verify(self, body: bytes) -> None:
        user = self._user()
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        payload = json.loads(body or b"{}")
        data = self.fake.lfs_objects.get(payload.get("oid"))
        if data is None or len(data) != int(payload.get("size", -1)):
            raise HubHTTPError(404, f"LFS object {payload.get('oid')} not found")
        self._json(200, {"success": True})

    def _commit(self, repo: Repo, rev: str, body: bytes) -> None:
        create_pr = (self._query.get("create_pr") or ["0"])[0] in ("1", "true", "True")
        head = self._get_commit(repo, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and parent != head.sha:
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        new = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = (value.get("path") or "").strip("/")
            if not path or ".." in path.split("/"):
                raise HubHTTPError(400, f"invalid path {path!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubHTTPError(400, "only base64 encoding is supported")
                new[path] = File(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.fake.lfs_objects.get(value.get("oid"))
                if data is None:
                    raise HubHTTPError(422, f"LFS object {value.get('oid')} for {path} was never uploaded; "
                                            "upload it before committing")
                if value.get("size") is not None and int(value["size"]) != len(data):
                    raise HubHTTPError(422, f"size mismatch for LFS object of {path}")
                new[path] = File(data, lfs=True)
            elif key == "deletedFile":
                if path not in new:
                    raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del new[path]
            elif key == "deletedFolder":
                gone = [p for p in new if p.startswith(path + "/")]
                if not gone:
                    raise HubHTTPError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del new[p]
            else:
                raise HubHTTPError(400, f"unsupported commit operation {key!r}")
        commit = self.fake._new_commit(repo, head.sha, new, header.get("summary") or "commit")
        pr_url = None
        if create_pr:
            repo.pr_count += 1
            repo.refs[f"refs/pr/{repo.pr_count}"] = commit.sha
            pr_url = f"{self._base_url(repo.repo_type, repo.repo_id)}/discussions/{repo.pr_count}"
        else:
            target = rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev
            if target not in repo.refs:
                raise HubHTTPError(400, f"cannot commit on {rev}: not a branch")
            repo.refs[target] = commit.sha
        self._json(200, {
            "success": True, "commitOid": commit.sha, "hookOutput": "",
            "commitUrl": f"{self._base_url(repo.repo_type, repo.repo_id)}/commit/{commit.sha}",
            "pullRequestUrl": pr_url,
        })

    def _branch(self, repo: Repo, branch: str, body: bytes, method: str) -> None:
        if method == "DELETE":
            if branch not in repo.refs or branch == "main":
                raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del repo.refs[branch]
            return self._json(200, {})
        if branch in repo.refs:
            raise HubHTTPError(409, "Reference already exists")
        if not re.fullmatch(r"[\w.\-/]+", branch) or branch.startswith("refs/"):
            raise HubHTTPError(400, f"invalid branch name {branch!r}")
        payload = json.loads(body or b"{}")
        start = self._get_commit(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = start.sha
        self._json(200, {})

    def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str, head_only: bool) -> None:
        user = self._user()
        with self.fake.lock:
            repo = self._get_repo(repo_type, repo_id, user)
            self._check_gate(repo, user)
            commit = self._get_commit(repo, rev)
            f = commit.files.get(path)
            if f is None:
                raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
            corrupt = (repo_id, path) in self.fake._corrupt or (None, path) in self.fake._corrupt
        self._maybe_fail("HEAD" if head_only else "GET", "", path)
        data = f.data
        if corrupt and not head_only and data:
            data = (bytes([data[0] ^ 0xFF]) + data[1:] if len(data) < 64
                    else data[:-33] + bytes([data[-33] ^ 0xFF]) + data[-32:])
        headers = {
            "X-Repo-Commit": commit.sha, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}";',
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(len(f.data))
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rng)
            size = len(data)
            if not m or (not m.group(1) and not m.group(2)):
                raise HubHTTPError(416, f"invalid range {rng}", headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(size - int(m.group(2)), 0), size - 1
            if start >= size or start > end:
                raise HubHTTPError(416, f"range {rng} not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return self._send(206, data[start:end + 1], headers, "application/octet-stream", head_only)
        self._send(200, data, headers, "application/octet-stream", head_only)


class _Dropped(Exception):
    """The handler closed the connection on purpose (failure injection)."""
