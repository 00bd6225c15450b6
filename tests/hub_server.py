"""A loopback stand-in for the public Hugging Face Hub, for tests (the real Hub cannot be reached).

It is a real HTTP server on 127.0.0.1 that speaks the routes the real ``huggingface_hub`` client
calls, so tests point the client at it with ``HF_ENDPOINT`` and change nothing else:

- downloads: ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{path}`` with the ``X-Repo-Commit``,
  ``ETag`` and ``Content-Length`` headers ``hf_hub_download`` relies on, and ``X-Error-Code``
  (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) on 404s;
- uploads: ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``,
  ``POST /api/models/{repo}/preupload/{revision}``, the Git LFS batch API
  (``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT`` of the object, sha256-checked),
  ``POST /api/models/{repo}/commit/{revision}`` (NDJSON) and ``POST /api/validate-yaml``.

Files whose names end with one of ``lfs_suffixes`` are asked for as LFS uploads, like the real
Hub does for binaries. The real Hub sends those to Xet storage when the ``hf_xet`` package is
installed; Xet is a separate content-addressed protocol this stand-in does not implement, so
clients that push here run with ``HF_HUB_DISABLE_XET=1`` (the client's plain LFS transfer).

Repos live in memory: branches point at commits, commits at ``{path: bytes}`` snapshots.

``outage=503`` (any status) makes it answer every download request (``HEAD``/``GET``) with that
status, as a Hub that is down, or a proxy that cannot reach it, does; requests are still recorded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API_REPO = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|branch)/(?P<rev>[^/]+)$"
)
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/lfs-objects/(?P<oid>[0-9a-f]{64})$")


@dataclass
class HubRepo:
    """One model repo: branches -> commit ids, commit ids -> file snapshots."""

    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)

    def snapshot(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.branches.get(revision, revision)
        files = self.commits.get(sha)
        return None if files is None else (sha, files)


class LoopbackHub:
    """The stand-in Hub: ``with LoopbackHub() as hub: env HF_ENDPOINT=hub.endpoint ...``.

    Args:
        token: if set, upload routes (and downloads of private repos) require
            ``Authorization: Bearer <token>`` and answer 401 otherwise.
        lfs_suffixes: file name endings the preupload route asks to send through LFS.
        outage: if set, the HTTP status every download is answered with (an unavailable Hub).
    """

    def __init__(
        self,
        token: str | None = None,
        lfs_suffixes: tuple[str, ...] = (".safetensors",),
        outage: int | None = None,
    ):
        self.token = token
        self.lfs_suffixes = lfs_suffixes
        self.outage = outage
        self.repos: dict[str, HubRepo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """Base URL to put in ``HF_ENDPOINT``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LoopbackHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def commit(
        self, repo_id: str, files: dict[str, bytes], message: str, branch: str = "main"
    ) -> str:
        """Record a commit of ``files`` (merged over the branch head) and return its id."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, HubRepo())
            parent = repo.snapshot(branch)
            merged = {**(parent[1] if parent else {}), **files}
            digest = hashlib.sha1(repr((repo_id, branch, len(repo.commits), message)).encode())
            sha = digest.hexdigest()
            repo.commits[sha] = merged
            repo.messages[sha] = message
            repo.branches[branch] = sha
            return sha

    def publish_folder(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        """Put every file of ``folder`` in ``repo_id`` as one commit (seeding, no HTTP)."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return self.commit(repo_id, files, f"publish {Path(folder).name}", branch)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (branch or commit id)."""
        snap = self.repos[repo_id].snapshot(revision)
        if snap is None:
            raise KeyError(f"{repo_id} has no revision {revision}")
        return snap[1]


def _make_handler(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        # -- plumbing -----------------------------------------------------------------------
        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict[str, str] | None = None,
            content_type: str = "application/json",
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(data).encode(), headers)

        def _error(
            self, status: int, message: str, code: str | None = None, **headers: str
        ) -> None:
            headers = {"X-Error-Message": message, **headers}
            if code:
                headers["X-Error-Code"] = code
            self._json(status, {"error": message}, headers)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorized(self) -> bool:
            return hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _route(self) -> str:
            path = urlsplit(self.path).path
            hub.requests.append((self.command, path))
            return path

        # -- downloads ----------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self._resolve(self._route())

        def do_GET(self) -> None:
            self._resolve(self._route())

        def _resolve(self, path: str) -> None:
            if hub.outage is not None:
                return self._error(hub.outage, "Service Unavailable")
            m = _RESOLVE.match(path)
            if not m:
                return self._error(404, f"no route {path}")
            repo = hub.repos.get(m["repo"])
            if repo is None or (repo.private and not self._authorized()):
                return self._error(404, "Repository not found", "RepoNotFound")
            snap = repo.snapshot(unquote(m["rev"]))
            if snap is None:
                return self._error(404, "Invalid rev id", "RevisionNotFound")
            sha, files = snap
            name = unquote(m["path"])
            if name not in files:
                # The commit header lets the client cache that the file does not exist.
                return self._error(
                    404, "Entry not found", "EntryNotFound", **{"X-Repo-Commit": sha}
                )
            data = files[name]
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            return self._send(
                200,
                data,
                {"X-Repo-Commit": sha, "ETag": etag},
                content_type="application/octet-stream",
            )

        # -- uploads ------------------------------------------------------------------------
        def do_PUT(self) -> None:
            path = self._route()
            m = _LFS_OBJECT.match(path)
            if not m:
                return self._error(404, f"no route {path}")
            data = self._body()
            if hashlib.sha256(data).hexdigest() != m["oid"]:
                return self._error(400, "uploaded content does not match its sha256 oid")
            hub.lfs_objects[m["oid"]] = data
            return self._send(200)

        def do_POST(self) -> None:
            path = self._route()
            if path == "/api/validate-yaml":
                self._body()
                return self._json(200, {"errors": [], "warnings": []})
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            if path == "/api/repos/create":
                return self._create_repo(json.loads(self._body()))
            if m := _LFS_BATCH.match(path):
                return self._lfs_batch(m["repo"], json.loads(self._body()))
            if m := _API_REPO.match(path):
                repo = hub.repos.get(m["repo"])
                body = self._body()
                if repo is None:
                    return self._error(404, "Repository not found", "RepoNotFound")
                rev = unquote(m["rev"])
                if m["op"] == "branch":
                    return self._create_branch(m["repo"], repo, rev)
                if rev not in repo.branches:
                    return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                if m["op"] == "preupload":
                    return self._preupload(json.loads(body))
                return self._commit(m["repo"], rev, body)
            return self._error(404, f"no route {path}")

        def _create_repo(self, payload: dict[str, Any]) -> None:
            repo_id = f"{payload.get('organization')}/{payload['name']}"
            if repo_id in hub.repos:
                return self._error(409, "You already created this model repo")
            hub.repos[repo_id] = HubRepo(private=payload.get("visibility") == "private")
            hub.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit")
            return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def _create_branch(self, repo_id: str, repo: HubRepo, branch: str) -> None:
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: {branch}")
            repo.branches[branch] = repo.branches["main"]
            return self._json(200, {})

        def _preupload(self, payload: dict[str, Any]) -> None:
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(hub.lfs_suffixes) else "regular",
                    "shouldIgnore": False,
                    "oid": None,
                }
                for f in payload["files"]
            ]
            return self._json(200, {"files": files})

        def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
            if repo_id not in hub.repos:
                return self._error(404, "Repository not found", "RepoNotFound")
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in hub.lfs_objects:
                    href = f"{hub.endpoint}/lfs-objects/{obj['oid']}"
                    entry["actions"] = {"upload": {"href": href}}
                objects.append(entry)
            return self._json(200, {"transfer": "basic", "objects": objects})

        def _commit(self, repo_id: str, branch: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next((x["value"] for x in lines if x["key"] == "header"), {})
            files: dict[str, bytes] = {}
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        return self._error(422, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = hub.lfs_objects[value["oid"]]
            sha = hub.commit(repo_id, files, header.get("summary", ""), branch)
            return self._json(
                200,
                {
                    "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}",
                    "commitOid": sha,
                    "success": True,
                },
            )

    return Handler
