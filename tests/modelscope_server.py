"""A small in-memory ModelScope hub for the real `modelscope` client (1.40, which delegates to `modelscope_hub`).

Why: hub_tools' ModelScope path must be tested against the actual client without the internet. Point the
client at it with `MODELSCOPE_ENDPOINT` (or the older `MODELSCOPE_DOMAIN`) = `http://127.0.0.1:PORT`.

Implemented (legacy `/api/v1` surface, the one the client uses for model repos), as observed from the client:
  POST /api/v1/models                                         create (JSON {Path, Name, Visibility, License})
  GET  /api/v1/models/{owner}/{name}                          repo info
  GET  /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=   file list (Path, Name, Size, Sha256, Type)
  GET  /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=          file bytes (Range supported)
  GET  /api/v1/models/{owner}/{name}/revisions                branches
  POST /api/v1/repos/models/{owner}/{name}/info/lfs/objects/batch      which blobs to upload (href or none)
  PUT  /_blob/{sha256}                                         blob upload
  POST /api/v1/repos/models/{owner}/{name}/commit/{revision}  {commit_message, actions:[{action, path, type,
                                                               size, sha256, content, encoding}]}
Auth: `Authorization: Bearer TOKEN` or cookie `m_session_id=TOKEN`. Responses use the legacy envelope
{"Code": 200, "Data": …, "Message": …, "Success": true}. Every other path answers 404 and is recorded in
`unknown` so a test can show which endpoints a client version needs that are not implemented.
Visibility: 5 = public, 1 = private (the client's wire encoding).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hub_server import read_request_body

DEFAULT_MS_TOKEN = "ms-testtoken-0123456789abcdef"
DEFAULT_MS_USER = "mstester"
PUBLIC, PRIVATE = 5, 1


@dataclass
class MSRepo:
    repo_id: str
    private: bool = False
    branches: dict = field(default_factory=dict)  # name -> {path: (bytes, lfs)}
    commits: list = field(default_factory=list)  # (branch, message)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]


class FakeModelScope:
    def __init__(self, tokens: dict | None = None):
        self.tokens = tokens or {DEFAULT_MS_TOKEN: DEFAULT_MS_USER}
        self.repos: dict = {}
        self.blobs: dict = {}
        self.requests: list = []  # (method, path)
        self.unknown: list = []
        self.corrupt_paths: set = set()
        self.fail_blob_puts = False  # answer 500 to every blob PUT (a storage outage)
        self.lock = threading.RLock()
        self._httpd = None

    def start(self) -> FakeModelScope:
        fake = self

        class Handler(_Handler):
            ms = fake

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add_repo(self, repo_id: str, files: dict | None = None, *, private: bool = False) -> MSRepo:
        with self.lock:
            repo = MSRepo(repo_id, private=private, branches={"master": {}})
            for path, data in (files or {}).items():
                data = data.encode() if isinstance(data, str) else data
                repo.branches["master"][path] = (data, path.endswith((".safetensors", ".bin", ".png")))
            self.repos[repo_id] = repo
            return repo

    def list_files(self, repo_id: str, revision: str = "master") -> list:
        with self.lock:
            return sorted(self.repos[repo_id].branches.get(revision, {}))

    def file_bytes(self, repo_id: str, path: str, revision: str = "master") -> bytes:
        with self.lock:
            return self.repos[repo_id].branches[revision][path][0]


class _Err(Exception):
    def __init__(self, status: int, message: str, code: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code or status


class _Handler(BaseHTTPRequestHandler):
    ms: FakeModelScope
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: without this each waits for a delayed ACK

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _body(self) -> bytes:
        return read_request_body(self)

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _ok(self, data=None) -> None:
        self._send(200, json.dumps({"Code": 200, "Data": data, "Message": "success", "Success": True,
                                    "RequestId": "req-test"}).encode())

    def _user(self) -> str | None:
        token = None
        auth = self.headers.get("Authorization") or ""
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        else:
            m = re.search(r"m_session_id=([^;]+)", self.headers.get("Cookie") or "")
            token = m.group(1) if m else None
        if token is None:
            return None
        user = self.ms.tokens.get(token)
        if user is None:
            raise _Err(401, "AccessToken is invalid or expired")
        return user

    def _handle(self) -> None:
        split = urlsplit(self.path)
        path, q = unquote(split.path), {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        body = b"" if self.command in ("GET", "HEAD") else self._body()
        with self.ms.lock:
            self.ms.requests.append((self.command, path))
        try:
            self._route(self.command, path, q, body)
        except _Err as e:
            self._send(e.status, json.dumps({"Code": e.code, "Message": e.message, "Success": False,
                                             "RequestId": "req-test"}).encode())

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle

    def _repo(self, repo_id: str, user: str | None, *, write: bool = False) -> MSRepo:
        repo = self.ms.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise _Err(404, f"model {repo_id} does not exist", 10010101)
        if write and user != repo.owner:
            raise _Err(403 if user else 401, f"no permission to write to {repo_id}")
        return repo

    def _route(self, method: str, path: str, q: dict, body: bytes) -> None:
        m = re.fullmatch(r"/_blob/([0-9a-f]{64})", path)
        if m and method == "PUT":
            if self.ms.fail_blob_puts:
                raise _Err(500, "storage unavailable (injected)")
            if hashlib.sha256(body).hexdigest() != m.group(1):
                raise _Err(400, "blob content does not match its sha256")
            with self.ms.lock:
                self.ms.blobs[m.group(1)] = body
            return self._ok({})
        user = self._user()
        if path == "/api/v1/models" and method == "POST":
            return self._create(json.loads(body or b"{}"), user)
        m = re.fullmatch(r"/api/v1/repos/models/([^/]+/[^/]+)/info/lfs/objects/batch", path)
        if m and method == "POST":
            self._repo(m.group(1), user, write=True)
            objects = []
            for obj in json.loads(body or b"{}").get("objects", []):
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.ms.blobs:
                    entry["actions"] = {"upload": {"href": f"{self.ms.url}/_blob/{obj['oid']}"}}
                objects.append(entry)
            return self._ok({"objects": objects})
        m = re.fullmatch(r"/api/v1/repos/models/([^/]+/[^/]+)/commit/(.+)", path)
        if m and method == "POST":
            return self._commit(self._repo(m.group(1), user, write=True), m.group(2), json.loads(body or b"{}"))
        m = re.fullmatch(r"/api/v1/models/([^/]+/[^/]+)(/.*)?", path)
        if m and method in ("GET", "HEAD"):
            repo = self._repo(m.group(1), user)
            sub = m.group(2) or ""
            if sub == "":
                return self._ok({"Id": 1, "Name": repo.repo_id.split("/")[1], "Path": repo.owner,
                                 "Visibility": PRIVATE if repo.private else PUBLIC, "Revision": "master"})
            if sub == "/revisions":
                return self._ok({"RevisionMap": {"Branches": [{"Revision": b} for b in sorted(repo.branches)],
                                                 "Tags": []}})
            if sub == "/repo/files":
                return self._files(repo, q.get("Revision") or "master")
            if sub == "/repo":
                return self._download(repo, q.get("Revision") or "master", q.get("FilePath") or "")
        with self.ms.lock:
            self.ms.unknown.append((method, path))
        raise _Err(404, f"no route for {method} {path}")

    def _create(self, payload: dict, user: str | None) -> None:
        if user is None:
            raise _Err(401, "login required")
        owner, name = payload.get("Path"), payload.get("Name")
        if owner != user:
            raise _Err(403, f"no permission to create models under {owner}")
        repo_id = f"{owner}/{name}"
        with self.ms.lock:
            if repo_id in self.ms.repos:
                raise _Err(400, "model already exists", 10010101001)
            self.ms.add_repo(repo_id, private=int(payload.get("Visibility", PUBLIC)) == PRIVATE)
        self._ok({"Id": 1, "Path": owner, "Name": name})

    def _branch(self, repo: MSRepo, revision: str) -> dict:
        if revision not in repo.branches:
            raise _Err(404, f"revision {revision} does not exist", 10010101)
        return repo.branches[revision]

    def _files(self, repo: MSRepo, revision: str) -> None:
        files = self._branch(repo, revision)
        out = [{"Path": p, "Name": p.rsplit("/", 1)[-1], "Size": len(d), "Sha256": hashlib.sha256(d).hexdigest(),
                "Type": "blob", "IsLFS": lfs, "Revision": revision} for p, (d, lfs) in sorted(files.items())]
        self._ok({"Files": out})

    def _download(self, repo: MSRepo, revision: str, file_path: str) -> None:
        files = self._branch(repo, revision)
        if file_path not in files:
            raise _Err(404, f"file {file_path} does not exist", 10010101)
        data = files[file_path][0]
        if file_path in self.ms.corrupt_paths and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], "application/octet-stream", headers)
        self._send(200, data, "application/octet-stream", headers)

    def _commit(self, repo: MSRepo, revision: str, payload: dict) -> None:
        with self.ms.lock:
            files = dict(repo.branches.get(revision, repo.branches["master"]))
            for act in payload.get("actions", []):
                path, action = act["path"], act.get("action", "create")
                if action == "delete":
                    files.pop(path, None)
                elif act.get("type") == "lfs":
                    blob = self.ms.blobs.get(act.get("sha256"))
                    if blob is None:
                        raise _Err(400, f"blob of {path} was never uploaded")
                    files[path] = (blob, True)
                else:
                    files[path] = (base64.b64decode(act.get("content") or ""), False)
            repo.branches[revision] = files
            repo.commits.append((revision, payload.get("commit_message")))
            sha = hashlib.sha1(json.dumps(sorted(files)).encode() + str(len(repo.commits)).encode()).hexdigest()
        self._ok({"CommitId": sha, "sha": sha})
