"""A local emulation of the Hugging Face Hub HTTP API, for tests that must not touch the network.

Standard library only. :class:`HubEmulator` serves, on ``127.0.0.1`` and an ephemeral port, the part of the
Hub API that ``huggingface_hub`` (2.x) and ``transformers`` (5.x) call when pushing and pulling models:

* ``GET  /api/whoami-v2``                                   who the (fake) token belongs to
* ``POST /api/repos/create``, ``DELETE /api/repos/delete``  repositories (409 when it exists)
* ``POST /api/validate-yaml``                               model-card metadata check (always valid)
* ``GET  /api/{type}s/{repo}[/revision/{rev}]``             repo info: ``sha``, ``siblings`` (``?blobs=1``)
* ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]``          tree listing (``?recursive=1``)
* ``POST /api/{type}s/{repo}/paths-info/{rev}``             info on given paths
* ``GET  /api/{type}s/{repo}/refs``, ``.../commits/{rev}``  branches, tags, history
* ``POST|DELETE /api/{type}s/{repo}/branch/{name}``, ``POST .../tag/{rev}``
* ``GET  /api/{type}s/{repo}/discussions``                  always empty
* ``POST /api/{type}s/{repo}/preupload/{rev}``              "regular" or "lfs" upload mode per file
* ``POST /api/{type}s/{repo}/commit/{rev}``                 NDJSON commit (``file``, ``lfsFile``,
  ``deletedFile``, ``deletedFolder``; ``?create_pr=1`` opens ``refs/pr/N``)
* ``POST /{prefix}{repo}.git/info/lfs/objects/batch``       git-LFS batch API (basic transfer), then
  ``PUT`` of the object and ``POST`` verify on emulator URLs
* ``HEAD|GET /{prefix}{repo}/resolve/{rev}/{path}``          downloads with ``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag``/``X-Linked-Size`` (LFS files), ``Content-Length``, ``Range``

``{type}`` is ``model``, ``dataset`` or ``space``; ``{prefix}`` is empty for models and ``datasets/`` or
``spaces/`` otherwise. Errors carry the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``) that the client turns into its typed exceptions.

New repositories start, like on the Hub, with a commit holding a ``.gitattributes`` that sends the usual
binary formats (``*.safetensors``, ``*.bin``, ...) to LFS. The client then uploads those files through the
LFS batch API; it must not use Xet (``HF_HUB_DISABLE_XET=1``, set by :meth:`HubEmulator.env`), which this
emulator does not implement. Xet routes answer 501 with a message saying so.

Requests the emulator does not know are answered 404 and recorded in :attr:`HubEmulator.unhandled`, so a
test can assert that the client only used emulated endpoints. Every request is logged in
:attr:`HubEmulator.requests` as ``(method, path)``.

The client reads ``HF_ENDPOINT`` when it is imported, so drive it in a subprocess: :func:`run_python` with
the environment from :meth:`HubEmulator.env`. The subprocess gets a guard that refuses any connection to an
address other than the loopback interface.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

FAKE_TOKEN = "hf_emulatorFakeToken0123456789abcdefgh"
"""The only token the emulator accepts for writes (and for private repositories)."""

FAKE_USER = "emulator-user"
"""User name the fake token belongs to: the namespace of repos created without one."""

DEFAULT_GITATTRIBUTES = (
    "".join(
        f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
        for pattern in (
            "*.7z",
            "*.arrow",
            "*.bin",
            "*.bz2",
            "*.ckpt",
            "*.ftz",
            "*.gz",
            "*.h5",
            "*.joblib",
            "*.msgpack",
            "*.npy",
            "*.npz",
            "*.onnx",
            "*.parquet",
            "*.pb",
            "*.pickle",
            "*.pkl",
            "*.pt",
            "*.pth",
            "*.safetensors",
            "*.tar",
            "*.tflite",
            "*.xz",
            "*.zip",
            "*tfevents*",
        )
    )
).encode()
"""The ``.gitattributes`` of the first commit of every new repository (like the Hub's)."""

REGULAR_FILE_MAX_SIZE = 10 * 1024 * 1024
"""Files larger than this go to LFS whatever ``.gitattributes`` says (the Hub's limit for regular files)."""

REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_LFS_ROUTE = "/__emulator_lfs__"
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
_REPO_ACTIONS = frozenset(
    (
        "revision",
        "tree",
        "paths-info",
        "preupload",
        "commit",
        "refs",
        "commits",
        "branch",
        "tag",
        "discussions",
    )
)


def git_blob_oid(content: bytes) -> str:
    """The git object id (SHA-1 of ``b"blob <size>\\0" + content``) of a file's content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file git would store in place of a file with this SHA-256 and size."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class Blob:
    """One stored file version: content and the identifiers the Hub reports for it."""

    content: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)

    @property
    def oid(self) -> str:
        """Git object id of what git stores: the pointer for LFS files, the content otherwise."""
        return git_blob_oid(self.pointer if self.lfs else self.content)

    @property
    def etag(self) -> str:
        """What ``/resolve`` reports as the file's ETag (SHA-256 for LFS files, git oid otherwise)."""
        return self.sha256 if self.lfs else self.oid

    @property
    def preupload_oid(self) -> str:
        """What ``/preupload`` reports so the client can skip unchanged files."""
        return self.sha256 if self.lfs else self.oid


@dataclass
class Commit:
    """A commit: full snapshot of the files plus metadata."""

    oid: str
    parents: list[str]
    title: str
    message: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    """One repository: commits, branches (``main``, ``refs/pr/N``, ...) and tags."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: int = 0

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch, tag, ``refs/heads/<branch>`` or full commit hash points to."""
        name = revision.removeprefix("refs/heads/")
        if name in self.branches:
            return self.commits[self.branches[name]]
        if revision.startswith("refs/tags/") and revision[len("refs/tags/") :] in self.tags:
            return self.commits[self.tags[revision[len("refs/tags/") :]]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        if _COMMIT_HASH.match(revision) and revision in self.commits:
            return self.commits[revision]
        return None


class HubError(Exception):
    """An HTTP error answer: status, ``X-Error-Code`` (or ``None``) and message."""

    def __init__(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class HubEmulator:
    """An in-memory Hub on ``127.0.0.1``: start with :meth:`start` (or ``with``), stop with :meth:`stop`.

    Args:
        lfs: ``"auto"`` (default): a file is uploaded through LFS when ``.gitattributes`` of the target
            revision says so or it is larger than 10 MiB, as on the Hub; ``"never"``: every file is a
            regular one (sent base64 inside the commit); ``"always"``: every non-empty file uses LFS.
        token: the token accepted for writes.
        user: the user name the token belongs to.
        home_root: where :meth:`env` creates fresh ``HF_HOME`` folders (the system temporary folder if None).
    """

    def __init__(
        self,
        *,
        lfs: str = "auto",
        token: str = FAKE_TOKEN,
        user: str = FAKE_USER,
        home_root: str | os.PathLike | None = None,
    ) -> None:
        if lfs not in ("auto", "never", "always"):
            raise ValueError(f"lfs must be 'auto', 'never' or 'always', got {lfs!r}")
        self.home_root = home_root
        self.lfs_mode = lfs
        self.token = token
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: what ``HF_ENDPOINT`` must be set to."""
        if self._server is None:
            raise RuntimeError("the hub emulator is not running: call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubEmulator:
        """Bind an ephemeral port on 127.0.0.1 and serve in a daemon thread."""
        if self._server is not None:
            return self
        handler = type("BoundHubHandler", (_HubHandler,), {"emulator": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="hub-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> HubEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(
        self, extra: Mapping[str, str] | None = None, *, hf_home: str | os.PathLike | None = None
    ) -> dict:
        """A copy of ``os.environ`` for a subprocess that talks to this emulator.

        Sets ``HF_ENDPOINT``, ``HF_TOKEN`` (the fake token), ``HF_HUB_DISABLE_TELEMETRY=1``,
        ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_PROGRESS_BARS=1``, a fresh ``HF_HOME`` (a new temporary
        directory unless ``hf_home`` is given; ``HF_HUB_CACHE``/``TRANSFORMERS_CACHE``/``HF_DATASETS_CACHE``
        are dropped so they follow it), ``NO_PROXY`` for the loopback and no proxy variables; removes
        ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``/``HF_DATASETS_OFFLINE``. ``extra`` is applied last.
        """
        env = dict(os.environ)
        for name in list(env):
            if name.lower() in ("http_proxy", "https_proxy", "all_proxy") or name in (
                "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE",
                "HF_DATASETS_OFFLINE",
                "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE",
                "TRANSFORMERS_CACHE",
                "HF_DATASETS_CACHE",
                "HF_TOKEN_PATH",
                "HF_HUB_ENABLE_HF_TRANSFER",
            ):
                del env[name]
        if hf_home is None:
            hf_home = tempfile.mkdtemp(prefix="hf-home-", dir=self.home_root)
        env.update(
            {
                "HF_ENDPOINT": self.endpoint,
                "HF_TOKEN": self.token,
                "HF_HOME": str(hf_home),
                "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
                "DISABLE_TELEMETRY": "1",
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        env.update(extra or {})
        return env

    def run_python(
        self,
        code: str,
        extra_env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        """:func:`run_python` with :meth:`env` (a fresh ``HF_HOME`` per call unless ``extra_env`` sets one)."""
        return run_python(code, self.env(extra_env), cwd=cwd, timeout=timeout)

    def assert_all_handled(self) -> None:
        """Fail, listing them, if the client sent requests the emulator has no route for."""
        assert not self.unhandled, f"requests the hub emulator does not emulate: {self.unhandled}"

    # ------------------------------------------------------------------ direct access for assertions
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repository (``KeyError`` naming it when missing)."""
        with self._lock:
            key = (repo_type, repo_id)
            if key not in self.repos:
                raise KeyError(
                    f"no {repo_type} repository {repo_id!r} on the emulator; have {sorted(self.repos)}"
                )
            return self.repos[key]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Path -> content of every file at ``revision``."""
        with self._lock:
            commit = self.repo(repo_id, repo_type).resolve(revision)
            if commit is None:
                raise KeyError(f"revision {revision!r} not found in {repo_id!r}")
            return {path: blob.content for path, blob in commit.files.items()}

    def lfs_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Paths stored through LFS at ``revision``."""
        with self._lock:
            commit = self.repo(repo_id, repo_type).resolve(revision)
            if commit is None:
                raise KeyError(f"revision {revision!r} not found in {repo_id!r}")
            return sorted(path for path, blob in commit.files.items() if blob.lfs)

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from ``revision``, newest first (first parents only)."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            commit = repo.resolve(revision)
            out = []
            while commit is not None:
                out.append(commit)
                commit = repo.commits[commit.parents[0]] if commit.parents else None
            return out

    # ------------------------------------------------------------------ repository operations
    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repository with an initial ``.gitattributes`` commit (409 ``HubError`` if it exists)."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise HubError(409, None, f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
            first = self._new_commit(
                repo, None, {".gitattributes": Blob(DEFAULT_GITATTRIBUTES, lfs=False)}, "initial commit", ""
            )
            repo.branches["main"] = first.oid
            self.repos[key] = repo
            return repo

    def _new_commit(
        self, repo: Repo, parent: Commit | None, files: dict[str, Blob], title: str, description: str
    ) -> Commit:
        listing = "\n".join(f"{path}\0{blob.oid}" for path, blob in sorted(files.items()))
        seed = (
            f"{repo.repo_type}/{repo.repo_id}\n{parent.oid if parent else ''}\n{title}\n{next(self._counter)}"
        )
        oid = hashlib.sha1(f"{seed}\n{listing}".encode()).hexdigest()
        message = title if not description else f"{title}\n\n{description}"
        commit = Commit(
            oid=oid,
            parents=[parent.oid] if parent else [],
            title=title,
            message=message,
            date=_now_iso(),
            files=dict(files),
        )
        repo.commits[oid] = commit
        return commit

    def _upload_mode(self, commit: Commit, path: str, size: int) -> str:
        if self.lfs_mode == "never" or size == 0:
            return "regular"
        if self.lfs_mode == "always" or size > REGULAR_FILE_MAX_SIZE:
            return "lfs"
        attributes = commit.files.get(".gitattributes")
        if attributes is None:
            return "regular"
        name = path.rsplit("/", 1)[-1]
        for line in attributes.content.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                pattern = parts[0]
                target = path if "/" in pattern.strip("/") else name
                if fnmatch.fnmatchcase(target, pattern.lstrip("/")):
                    return "lfs"
        return "regular"


# ---------------------------------------------------------------------- HTTP layer
class _HubHandler(BaseHTTPRequestHandler):
    """Routes requests to the emulator bound on the subclass as ``emulator``."""

    emulator: HubEmulator
    protocol_version = "HTTP/1.1"
    server_version = "HubEmulator/1.0"
    timeout = 60

    # -- plumbing
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size_line = self.rfile.readline().strip()
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._json(error.status, {"error": error.message}, headers)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.emulator.token}"

    def _require_auth(self) -> None:
        if not self._authorized():
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = {k: v for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        raw_path = split.path
        self.emulator.requests.append((self.command, raw_path))
        body = self._read_body() if self.command in ("POST", "PUT", "DELETE", "PATCH") else b""
        try:
            if not self._route(raw_path, body):
                self.emulator.unhandled.append((self.command, self.path))
                raise HubError(404, None, f"hub emulator: no route for {self.command} {self.path}")
        except HubError as error:
            self._error(error)
        except Exception as exc:  # a bug in the emulator: answer 500 with the reason
            self._json(500, {"error": f"hub emulator crashed: {type(exc).__name__}: {exc}"})
            raise

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

    def _flag(self, name: str) -> bool:
        values = self.query.get(name)
        return bool(values) and values[-1].lower() in ("1", "true", "yes")

    # -- routing
    def _route(self, raw_path: str, body: bytes) -> bool:
        segments = [unquote(s) for s in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
        method = self.command
        if segments[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if segments[:2] == ["api", "repos"] and len(segments) == 3:
            if segments[2] == "create" and method == "POST":
                return self._create_repo(body)
            if segments[2] == "delete" and method == "DELETE":
                return self._delete_repo(body)
        if segments[:2] == ["api", "validate-yaml"] and method == "POST":
            self._json(200, {"errors": [], "warnings": []})
            return True
        if len(segments) >= 3 and segments[0] == "api" and segments[1].rstrip("s") in REPO_TYPES:
            rest = segments[2:]
            if len(rest) == 1 or rest[1] in _REPO_ACTIONS:  # an id without namespace: never stored here
                rest = [rest[0], ""] + rest[1:]
            return self._api_repo(segments[1].rstrip("s"), rest, body)
        if segments[:1] == [_LFS_ROUTE.strip("/")]:
            return self._lfs_object(segments[1:], body)
        repo_type, rest = "model", segments
        if rest and rest[0] in ("datasets", "spaces"):
            repo_type, rest = rest[0].rstrip("s"), rest[1:]
        if len(rest) >= 4 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        if len(rest) >= 3 and rest[1] == "resolve" and method in ("GET", "HEAD"):  # id without namespace
            return self._resolve(repo_type, rest[0], rest[2], "/".join(rest[3:]))
        if len(rest) >= 6 and rest[1].endswith(".git") and rest[2:6] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(repo_type, f"{rest[0]}/{rest[1][: -len('.git')]}", body)
        return False

    def _api_repo(self, repo_type: str, rest: list[str], body: bytes) -> bool:
        # /api/{type}s/{ns}/{name}[/action/...]
        repo_id = f"{rest[0]}/{rest[1]}" if rest[1] else rest[0]
        action, args = (rest[2], rest[3:]) if len(rest) > 2 else (None, [])
        method = self.command
        if action is None and method == "GET":
            return self._repo_info(repo_type, repo_id, "main")
        if action == "revision" and args and method == "GET":
            return self._repo_info(repo_type, repo_id, args[0])
        if action == "tree" and args and method == "GET":
            return self._tree(repo_type, repo_id, args[0], "/".join(args[1:]))
        if action == "paths-info" and args and method == "POST":
            return self._paths_info(repo_type, repo_id, args[0], body)
        if action == "preupload" and args and method == "POST":
            return self._preupload(repo_type, repo_id, args[0], body)
        if action == "commit" and args and method == "POST":
            return self._commit(repo_type, repo_id, args[0], body)
        if action == "refs" and not args and method == "GET":
            return self._refs(repo_type, repo_id)
        if action == "commits" and args and method == "GET":
            return self._commits(repo_type, repo_id, args[0])
        if action == "branch" and args:
            return self._branch(repo_type, repo_id, "/".join(args), body)
        if action == "tag" and args and method == "POST":
            return self._tag(repo_type, repo_id, args[0], body)
        if action == "discussions" and method == "GET" and not args:
            self._repo_for_read(repo_type, repo_id)
            self._json(200, {"discussions": [], "count": 0, "start": 0, "numItemsPerPage": 50})
            return True
        if action in ("xet-write-token", "xet-read-token"):
            raise HubError(
                501,
                None,
                "hub emulator: Xet storage is not emulated; set HF_HUB_DISABLE_XET=1 (HubEmulator.env() does)",
            )
        return False

    # -- helpers on repos
    def _repo_for_read(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.emulator.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized()):
            raise HubError(
                404,
                "RepoNotFound",
                f"Repository Not Found: {repo_type} {repo_id!r} does not exist on the hub emulator",
            )
        return repo

    def _repo_for_write(self, repo_type: str, repo_id: str) -> Repo:
        self._require_auth()
        return self._repo_for_read(repo_type, repo_id)

    def _commit_for(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _file_entry(self, path: str, blob: Blob, commit: Commit | None = None, expand: bool = False) -> dict:
        entry: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
        if expand and commit is not None:
            entry["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
        return entry

    @staticmethod
    def _folder_entry(path: str, commit: Commit) -> dict:
        return {
            "type": "directory",
            "oid": hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest(),
            "path": path,
        }

    def _url_prefix(self, repo_type: str) -> str:
        return f"{self.emulator.endpoint}/{_URL_PREFIX[repo_type]}"

    # -- endpoints
    def _whoami(self) -> bool:
        self._require_auth()
        self._json(
            200,
            {
                "type": "user",
                "id": "emulator-user-id",
                "name": self.emulator.user,
                "fullname": "Hub Emulator User",
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "hub-emulator", "role": "write", "createdAt": _now_iso()},
                },
            },
        )
        return True

    def _create_repo(self, body: bytes) -> bool:
        self._require_auth()
        payload = json.loads(body or b"{}")
        name = payload.get("name")
        if not name or "/" in name:
            raise HubError(400, None, f"invalid repository name {name!r}")
        namespace = payload.get("organization") or self.emulator.user
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, None, f"invalid repository type {repo_type!r}")
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo_id = f"{namespace}/{name}"
        url = f"{self._url_prefix(repo_type)}{repo_id}"
        try:
            self.emulator.create_repo(repo_id, repo_type, private)
        except HubError as error:
            self._json(409, {"error": error.message, "url": url}, {"X-Error-Message": error.message})
            return True
        self._json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})
        return True

    def _delete_repo(self, body: bytes) -> bool:
        self._require_auth()
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.emulator.user}/{payload.get('name')}"
        with self.emulator._lock:
            if self.emulator.repos.pop((repo_type, repo_id), None) is None:
                raise HubError(404, "RepoNotFound", f"Repository Not Found: {repo_id}")
        self._send(200, b"")
        return True

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> bool:
        with self.emulator._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            commit = self._commit_for(repo, revision)
            blobs = self._flag("blobs")
            siblings = []
            for path, blob in sorted(commit.files.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sibling.update(size=blob.size, blobId=blob.oid)
                    if blob.lfs:
                        sibling["lfs"] = {
                            "size": blob.size,
                            "sha256": blob.sha256,
                            "pointerSize": len(blob.pointer),
                        }
                siblings.append(sibling)
            info: dict[str, Any] = {
                "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
            if repo_type == "model":
                info["modelId"] = repo_id
                config = commit.files.get("config.json")
                if config is not None:
                    try:
                        parsed = json.loads(config.content)
                        info["config"] = {
                            k: parsed[k] for k in ("architectures", "model_type", "auto_map") if k in parsed
                        }
                    except ValueError:
                        pass
        self._json(200, info)
        return True

    def _children(self, commit: Commit, prefix: str, recursive: bool, expand: bool) -> list[dict]:
        folders: set[str] = set()
        entries: list[dict] = []
        base = f"{prefix}/" if prefix else ""
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            rel_parts = path[len(base) :].split("/")
            for depth in range(1, len(rel_parts)):
                if not recursive and depth > 1:
                    break
                folders.add(base + "/".join(rel_parts[:depth]))
            if recursive or len(rel_parts) == 1:
                entries.append(self._file_entry(path, blob, commit, expand))
        entries.extend(self._folder_entry(folder, commit) for folder in sorted(folders))
        return sorted(entries, key=lambda e: (e["type"] != "directory", e["path"]))

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> bool:
        with self.emulator._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            commit = self._commit_for(repo, revision)
            path = path.strip("/")
            if path and path in commit.files:
                entries = [self._file_entry(path, commit.files[path], commit, self._flag("expand"))]
            else:
                if path and not any(p.startswith(f"{path}/") for p in commit.files):
                    raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision!r}")
                entries = self._children(commit, path, self._flag("recursive"), self._flag("expand"))
        self._json(200, entries)
        return True

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> bool:
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            payload = json.loads(body or b"{}")
            paths = payload.get("paths", [])
            expand = bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[-1].lower() in ("1", "true")
        with self.emulator._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            commit = self._commit_for(repo, revision)
            out = []
            for path in paths:
                path = path.strip("/")
                if path in commit.files:
                    out.append(self._file_entry(path, commit.files[path], commit, expand))
                elif any(p.startswith(f"{path}/") for p in commit.files):
                    out.append(self._folder_entry(path, commit))
        self._json(200, out)
        return True

    def _preupload(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> bool:
        payload = json.loads(body or b"{}")
        with self.emulator._lock:
            repo = self._repo_for_write(repo_type, repo_id)
            commit = repo.resolve(revision) or self._commit_for(repo, "main")
            answers = []
            for item in payload.get("files", []):
                path = item["path"]
                mode = self.emulator._upload_mode(commit, path, int(item.get("size", 0)))
                existing = commit.files.get(path)
                answers.append(
                    {
                        "path": path,
                        "uploadMode": mode,
                        "shouldIgnore": False,
                        "oid": existing.preupload_oid if existing is not None else None,
                    }
                )
        self._json(200, {"files": answers, "commitOid": commit.oid})
        return True

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> bool:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "commit payload must start with a 'header' line")
        header = lines[0]["value"]
        create_pr = self._flag("create_pr")
        with self.emulator._lock:
            repo = self._repo_for_write(repo_type, repo_id)
            parent = self._commit_for(repo, revision)
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != parent.oid:
                raise HubError(
                    412, None, f"A commit has happened since {parent_commit}. Please refresh and try again."
                )
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = str(value.get("path", "")).strip("/")
                if not path:
                    raise HubError(400, None, f"commit line without a path: {line}")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        content = str(value["content"]).encode()
                    else:
                        content = base64.b64decode(value["content"])
                    files[path] = Blob(content, lfs=False)
                elif key == "lfsFile":
                    oid = value.get("oid")
                    data = self.emulator.lfs_objects.get(oid)
                    if data is None:
                        raise HubError(
                            422,
                            None,
                            f"LFS object {oid} for {path!r} was never uploaded through the LFS batch API",
                        )
                    if value.get("size") is not None and int(value["size"]) != len(data):
                        raise HubError(
                            422, None, f"LFS object {oid}: size {value['size']} != stored {len(data)}"
                        )
                    files[path] = Blob(data, lfs=True)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                    del files[path]
                elif key == "deletedFolder":
                    doomed = [p for p in files if p.startswith(f"{path}/")]
                    if not doomed:
                        raise HubError(404, "EntryNotFound", f"A folder with this name doesn't exist: {path}")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, None, f"hub emulator: unsupported commit operation {key!r}")
            commit = self.emulator._new_commit(
                repo, parent, files, header.get("summary") or "commit", header.get("description") or ""
            )
            pr_url = None
            if create_pr:
                repo.pull_requests += 1
                branch = f"refs/pr/{repo.pull_requests}"
                pr_url = f"{self._url_prefix(repo_type)}{repo_id}/discussions/{repo.pull_requests}"
            else:
                branch = revision.removeprefix("refs/heads/")
                if branch not in repo.branches:
                    if _COMMIT_HASH.match(revision):
                        raise HubError(400, None, "cannot commit on top of a commit hash: use a branch")
                    raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            repo.branches[branch] = commit.oid
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._url_prefix(repo_type)}{repo_id}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            },
        )
        return True

    def _refs(self, repo_type: str, repo_id: str) -> bool:
        with self.emulator._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                for name, oid in sorted(repo.branches.items())
                if not name.startswith("refs/pr/")
            ]
            tags = [
                {"name": n, "ref": f"refs/tags/{n}", "targetCommit": o} for n, o in sorted(repo.tags.items())
            ]
            prs = [
                {"name": name.rsplit("/", 1)[-1], "ref": name, "targetCommit": oid}
                for name, oid in sorted(repo.branches.items())
                if name.startswith("refs/pr/")
            ]
        payload: dict[str, Any] = {"branches": branches, "tags": tags, "converts": []}
        if self._flag("include_prs"):
            payload["pullRequests"] = prs
        self._json(200, payload)
        return True

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> bool:
        with self.emulator._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            commit: Commit | None = self._commit_for(repo, revision)
            out = []
            while commit is not None:
                out.append(
                    {
                        "id": commit.oid,
                        "title": commit.title,
                        "message": commit.message,
                        "date": commit.date,
                        "authors": [{"user": self.emulator.user}],
                    }
                )
                commit = repo.commits[commit.parents[0]] if commit.parents else None
        self._json(200, out)
        return True

    def _branch(self, repo_type: str, repo_id: str, branch: str, body: bytes) -> bool:
        with self.emulator._lock:
            repo = self._repo_for_write(repo_type, repo_id)
            if self.command == "POST":
                payload = json.loads(body or b"{}")
                if branch in repo.branches:
                    raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
                start = self._commit_for(repo, payload.get("startingPoint") or "main")
                repo.branches[branch] = start.oid
            elif self.command == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
                del repo.branches[branch]
            else:
                return False
        self._send(200, b"{}")
        return True

    def _tag(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> bool:
        payload = json.loads(body or b"{}")
        with self.emulator._lock:
            repo = self._repo_for_write(repo_type, repo_id)
            tag = payload.get("tag")
            if not tag:
                raise HubError(400, None, "missing 'tag'")
            if tag in repo.tags:
                raise HubError(409, None, f"Tag already exists: {tag}")
            repo.tags[tag] = self._commit_for(repo, revision).oid
        self._send(200, b"{}")
        return True

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> bool:
        with self.emulator._lock:
            repo = self._repo_for_read(repo_type, repo_id)
            commit = self._commit_for(repo, revision)
            blob = commit.files.get(path)
            if blob is None:
                raise HubError(
                    404,
                    "EntryNotFound",
                    f"Entry not found: {path!r} at {revision!r} of {repo_id!r}",
                    {"X-Repo-Commit": commit.oid},
                )
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"',
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        content = blob.content
        status = 200
        range_header = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header or "")
        if match and blob.size:
            start = int(match.group(1)) if match.group(1) else max(blob.size - int(match.group(2) or 0), 0)
            end = int(match.group(2)) if match.group(1) and match.group(2) else blob.size - 1
            end = min(end, blob.size - 1)
            if start > end:
                self._send(416, b"", {"Content-Range": f"bytes */{blob.size}"})
                return True
            content = content[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        self._send(status, content, headers)
        return True

    # -- git LFS
    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> bool:
        payload = json.loads(body or b"{}")
        with self.emulator._lock:
            self._repo_for_write(repo_type, repo_id)
        if payload.get("operation") != "upload":
            raise HubError(400, None, "hub emulator: only the LFS 'upload' operation is emulated")
        base = f"{self.emulator.endpoint}{_LFS_ROUTE}"
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            if oid in self.emulator.lfs_objects:
                objects.append({"oid": oid, "size": size})  # already there: no actions
                continue
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{base}/{oid}/{size}"},
                        "verify": {"href": f"{base}/verify"},
                    },
                }
            )
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})
        return True

    def _lfs_object(self, args: list[str], body: bytes) -> bool:
        if self.command == "PUT" and len(args) == 2:
            oid, size = args[0], int(args[1])
            if hashlib.sha256(body).hexdigest() != oid or len(body) != size:
                raise HubError(400, None, f"LFS upload of {oid}: content does not match its sha256/size")
            with self.emulator._lock:
                self.emulator.lfs_objects[oid] = body
            self._send(200, b"", {"ETag": f'"{oid}"'})
            return True
        if self.command == "POST" and args == ["verify"]:
            payload = json.loads(body or b"{}")
            data = self.emulator.lfs_objects.get(payload.get("oid"))
            if data is None or len(data) != int(payload.get("size", -1)):
                raise HubError(404, None, f"LFS object {payload.get('oid')} was not uploaded")
            self._json(200, {"success": True})
            return True
        return False


# ---------------------------------------------------------------------- subprocess driver
_NETWORK_GUARD = """
import socket as _hub_emulator_socket

_HUB_EMULATOR_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_hub_emulator_connect = _hub_emulator_socket.socket.connect
_hub_emulator_connect_ex = _hub_emulator_socket.socket.connect_ex


def _hub_emulator_check(address):
    if isinstance(address, tuple) and address and str(address[0]) not in _HUB_EMULATOR_LOOPBACK:
        raise ConnectionRefusedError(f"hub emulator network guard: connection to {address!r} refused (tests are offline)")


def _hub_emulator_guarded_connect(self, address):
    _hub_emulator_check(address)
    return _hub_emulator_connect(self, address)


def _hub_emulator_guarded_connect_ex(self, address):
    _hub_emulator_check(address)
    return _hub_emulator_connect_ex(self, address)


_hub_emulator_socket.socket.connect = _hub_emulator_guarded_connect
_hub_emulator_socket.socket.connect_ex = _hub_emulator_guarded_connect_ex
del _hub_emulator_socket
"""


def run_python(
    code: str,
    env: Mapping[str, str],
    cwd: str | os.PathLike | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) with ``sys.executable`` in a subprocess and return the finished process.

    A guard prepended to ``code`` makes any socket connection to an address other than the loopback
    interface fail. Raises ``AssertionError`` showing the code, stdout and stderr when the exit status is
    not 0, ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
    """
    source = _NETWORK_GUARD + "\n" + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", source],
        env=dict(env),
        cwd=None if cwd is None else str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess exited with status {proc.returncode}\n--- code ---\n{textwrap.dedent(code)}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def iter_files(folder: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """``(posix relative path, content)`` of every file under ``folder``, sorted (for comparisons)."""
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        yield path.relative_to(root).as_posix(), path.read_bytes()


def _main() -> None:  # pragma: no cover - manual use: python tests/hub_emulator.py
    with HubEmulator() as hub:
        print(f"hub emulator on {hub.endpoint} (token {hub.token}); Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    _main()
