"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for testing push and pull offline.

It speaks the routes huggingface_hub 2.4 uses for model repos (create/delete, info, tree, refs,
preupload, ndjson commits, tags, branches, commits, paths-info, resolve downloads with Range),
keeps repos in memory as git-like commits, maps tokens to users, and only lets a user write to
their own namespace.

By default every file is uploaded in "regular" mode (inline in the commit). With ``lfs = True`` the
server asks for weights (``*.safetensors``, ``*.bin``) through the git-LFS batch API, as the real Hub
does for a client with ``HF_HUB_DISABLE_XET=1``. The real Hub's Xet storage is never exercised.

It can also be hostile, per file: list a size other than the file's (``listed_sizes``), send bytes
past the end of a file until the client hangs up (``overflowing``), drop every transfer of a file
after some bytes while ignoring Range so a client restarts it forever (``dropping``), or hold every
download until a test lets it go (``download_gate``). The content builders at the end make the
hostile files themselves: a pickle that leaves a marker file if it is ever unpickled, a YAML alias
bomb, and adapter weights with NaNs.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import pickle
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
LFS_PATTERNS = ("*.safetensors", "*.bin")
KNOWN_LICENSES = ("apache-2.0", "mit", "cc-by-4.0", "llama2", "other")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(data)}\nsize {len(data)}\n".encode()
    )


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    date: str
    lfs: set[str] = field(default_factory=set)  # paths stored through git-LFS

    def entry(self, path: str, listed_size: int | None = None) -> dict:
        """The file as the tree and paths-info routes describe it; LFS files point at their sha256.

        ``listed_size`` is the size to claim instead of the true one (a hostile listing).
        """
        data = self.files[path]
        size = len(data) if listed_size is None else listed_size
        if path not in self.lfs:
            return {"type": "file", "oid": git_blob_sha(data), "size": size, "path": path}
        pointer = lfs_pointer(data)
        lfs = {"oid": sha256(data), "size": size, "pointerSize": len(pointer)}
        return {"type": "file", "oid": git_blob_sha(pointer), "size": size, "path": path, "lfs": lfs}


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class HubError(Exception):
    """An error answer: 4xx status, ``X-Error-Code`` header and JSON body, like the real Hub."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: object) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class FakeHub:
    """The server's state; ``tokens`` maps a bearer token to its user name."""

    tokens: dict[str, str] = field(default_factory=lambda: {"alice-token": "alice", "bob-token": "bob"})
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    # Path suffixes whose next GET is cut off halfway, to exercise resumed (Range) downloads.
    cut_next_download: set[str] = field(default_factory=set)
    lfs: bool = False
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    # Hostile behaviours, keyed by the file's path in its repo:
    listed_sizes: dict[str, int] = field(default_factory=dict)  # the size info and tree claim
    overflowing: set[str] = field(default_factory=set)  # GET sends the file, then zeros until hang-up
    dropping: dict[str, int] = field(default_factory=dict)  # GET: 200 (Range ignored), N bytes, drop
    download_gate: threading.Event | None = None  # when set to a clear event, downloads wait for it
    lock: threading.RLock = field(default_factory=threading.RLock)
    url: str = ""

    def reset(self) -> None:
        with self.lock:
            self.repos.clear()
            self.requests.clear()
            self.cut_next_download.clear()
            self.lfs = False
            self.lfs_objects.clear()
            self.listed_sizes.clear()
            self.overflowing.clear()
            self.dropping.clear()
            self.download_gate = None

    def downloads(self, file_name: str) -> int:
        """How many GETs of a file named ``file_name`` (in any repo) the server has seen."""
        with self.lock:
            return sum(
                method == "GET" and "/resolve/" in path and path.endswith(f"/{file_name}")
                for method, path in self.requests
            )

    # -- repository model -------------------------------------------------------------------------

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        self.repos[repo_id] = repo
        self.commit(repo, None, {".gitattributes": GITATTRIBUTES}, [], "initial commit")
        return repo

    def commit(
        self,
        repo: Repo,
        branch: str | None,
        added: dict[str, bytes],
        deleted: list[str],
        title: str,
        lfs: set[str] = frozenset(),
    ) -> Commit:
        branch = branch or "main"
        parent = repo.branches.get(branch)
        files = dict(repo.commits[parent].files) if parent else {}
        for path in deleted:
            files = {
                name: data for name, data in files.items() if name != path and not name.startswith(path + "/")
            }
        files.update(added)
        lfs_paths = (repo.commits[parent].lfs - set(added) if parent else set()) | set(lfs)
        seed = f"{repo.repo_id}{parent}{title}{time.time_ns()}{sorted(files)}".encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, files, title, _now(), lfs_paths & set(files))
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def resolve(self, repo: Repo, revision: str) -> Commit:
        revision = unquote(revision)
        sha = repo.branches.get(revision) or repo.tags.get(revision)
        if sha is None and COMMIT_SHA.match(revision) and revision in repo.commits:
            sha = revision
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    # -- serving ----------------------------------------------------------------------------------

    def serve(self) -> tuple[ThreadingHTTPServer, threading.Thread]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        return server, thread


@contextlib.contextmanager
def running_hub() -> Iterator[FakeHub]:
    """A fake Hub serving on a free port for the duration of the block."""
    hub = FakeHub()
    server, thread = hub.serve()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.hub = hub
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: pytest shows the test's own output."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- plumbing ---------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        # Read the body even when the route ignores it: with keep-alive an unread body corrupts the
        # next request on the connection.
        self.body = self._read_body()
        parts = urlsplit(self.path)
        self.query = parse_qs(parts.query)
        path = parts.path
        with self.hub.lock:
            self.hub.requests.append((method, path))
        try:
            with self.hub.lock:
                self.user = self._user()
            self._route(method, path)
        except HubError as err:
            body = {"error": err.message, **err.extra}
            self._send_json(body, status=err.status, headers={"X-Error-Code": err.code or ""})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():
            pass  # trailers
        return b"".join(chunks)

    def _route(self, method: str, path: str) -> None:
        routes = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/repos/delete", self._delete_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(/revision/(?P<rev>.+))?", self._info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(/(?P<sub>.*))?", self._tree),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/refs", self._refs),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/commits/(?P<rev>.+)", self._commits),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>.+)", self._paths_info),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self._commit),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/tag/(?P<rev>.+)", self._create_tag),
            ("DELETE", r"/api/models/(?P<repo>[^/]+/[^/]+)/tag/(?P<tag>.+)", self._delete_tag),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)", self._create_branch),
            ("DELETE", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)", self._delete_branch),
            ("POST", r"/(?P<repo>[^/]+/[^/]+?)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs-objects/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/lfs-verify/(?P<oid>[0-9a-f]{64})", self._lfs_verify),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._download),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._download),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and route_method == method:
                arguments = {key: unquote(value) for key, value in match.groupdict().items() if value}
                if handler == self._download:  # takes the lock itself: it may stream or wait for long
                    handler(**arguments)
                    return
                with self.hub.lock:
                    handler(**arguments)
                return
        raise HubError(404, f"no route for {method} {path}")

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        user = self.hub.tokens.get(auth.removeprefix("Bearer ").strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if value:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _json_body(self) -> dict:
        return json.loads(self.body or b"{}")

    def _readable(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and self.user != repo_id.split("/")[0]):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str) -> Repo:
        repo = self._readable(repo_id)
        self._check_namespace(repo_id)
        return repo

    def _check_namespace(self, repo_id: str) -> None:
        if self.user is None:
            raise HubError(401, "You must be authenticated to write")
        if repo_id.split("/")[0] != self.user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")

    # -- routes -----------------------------------------------------------------------------------

    def _whoami(self) -> None:
        if self.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json({"type": "user", "name": self.user, "orgs": [], "auth": {"type": "access_token"}})

    def _create_repo(self) -> None:
        body = self._json_body()
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        self._check_namespace(repo_id)
        if repo_id in self.hub.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
        self.hub.create_repo(
            repo_id, private=body.get("visibility") == "private" or bool(body.get("private"))
        )
        self._send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _delete_repo(self) -> None:
        body = self._json_body()
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        self._writable(repo_id)
        del self.hub.repos[repo_id]
        self._send_json({})

    def _validate_yaml(self) -> None:
        import yaml

        content = self._json_body().get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            self._refuse_metadata(f"Invalid YAML in README.md: {err}")
        if not isinstance(metadata, dict):
            self._refuse_metadata("README.md metadata must be a YAML mapping")
        if metadata.get("license", "other") not in KNOWN_LICENSES:
            self._refuse_metadata(f'"license" must be one of [{", ".join(KNOWN_LICENSES)}]')
        self._send_json({"errors": [], "warnings": []})

    def _refuse_metadata(self, message: str) -> None:
        raise HubError(400, "Invalid metadata", errors=[{"message": message}], warnings=[])

    def _info(self, repo: str, rev: str = "main") -> None:
        repository = self._readable(repo)
        commit = self.hub.resolve(repository, rev)
        siblings = []
        for path in sorted(commit.files):
            entry = commit.entry(path, self.hub.listed_sizes.get(path))
            sibling = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
            if "lfs" in entry:
                lfs = entry["lfs"]
                sibling["lfs"] = {
                    "size": lfs["size"],
                    "sha256": lfs["oid"],
                    "pointerSize": lfs["pointerSize"],
                }
            siblings.append(sibling)
        self._send_json(
            {
                "_id": repo,
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.sha,
                "private": repository.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "lastModified": commit.date,
                "createdAt": commit.date,
                "siblings": siblings,
            }
        )

    def _entries(self, commit: Commit, prefix: str, recursive: bool) -> list[dict]:
        entries, folders = [], set()
        for path in sorted(commit.files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            if "/" in rest and not recursive:
                folders.add(f"{prefix}/{rest.split('/')[0]}" if prefix else rest.split("/")[0])
                continue
            entries.append(commit.entry(path, self.hub.listed_sizes.get(path)))
        entries += [
            {"type": "directory", "oid": "0" * 40, "size": 0, "path": path} for path in sorted(folders)
        ]
        return entries

    def _tree(self, repo: str, rev: str, sub: str = "") -> None:
        commit = self.hub.resolve(self._readable(repo), rev)
        entries = self._entries(commit, sub.strip("/"), self.query.get("recursive", ["false"])[0] == "true")
        if sub and not entries:
            raise HubError(404, f"{sub} does not exist", "EntryNotFound")
        self._send_json(entries)

    def _refs(self, repo: str) -> None:
        repository = self._readable(repo)

        def refs(names: dict[str, str], kind: str) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in names.items()]

        self._send_json(
            {
                "branches": refs(repository.branches, "heads"),
                "tags": refs(repository.tags, "tags"),
                "converts": [],
                "pullRequests": [],
            }
        )

    def _commits(self, repo: str, rev: str) -> None:
        repository = self._readable(repo)
        commit: Commit | None = self.hub.resolve(repository, rev)
        history = []
        while commit is not None:
            history.append(
                {"id": commit.sha, "title": commit.title, "message": "", "authors": [], "date": commit.date}
            )
            commit = repository.commits.get(commit.parent) if commit.parent else None
        self._send_json(history)

    def _paths_info(self, repo: str, rev: str) -> None:
        commit = self.hub.resolve(self._readable(repo), rev)
        form = parse_qs(self.body.decode())
        paths = form.get("paths") or self._json_body().get("paths", [])
        entries = self._entries(commit, "", recursive=True)
        self._send_json([entry for entry in entries if entry["path"] in paths])

    def _preupload(self, repo: str, rev: str) -> None:
        repository = self._writable(repo)
        files = self.hub.resolve(repository, rev).files
        answers = []
        for item in self._json_body()["files"]:
            lfs = self.hub.lfs and any(fnmatch.fnmatch(item["path"], pattern) for pattern in LFS_PATTERNS)
            answer = {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if item["path"] in files:
                data = files[item["path"]]
                answer["oid"] = sha256(data) if lfs else git_blob_sha(data)
            answers.append(answer)
        self._send_json({"files": answers, "commitOid": self.hub.resolve(repository, rev).sha})

    def _commit(self, repo: str, rev: str) -> None:
        repository = self._writable(repo)
        branch = unquote(rev)
        if branch not in repository.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        added: dict[str, bytes] = {}
        lfs: set[str] = set()
        deleted: list[str] = []
        title = "commit"
        for line in self.body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                title = value.get("summary") or title
                parent = value.get("parentCommit")
                if parent and parent != repository.branches[branch]:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif item["key"] == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise HubError(400, f"LFS object {value['oid']} was never uploaded")
                added[value["path"]] = self.hub.lfs_objects[value["oid"]]
                lfs.add(value["path"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"].rstrip("/"))
            else:
                raise HubError(400, f"this test server does not support '{item['key']}' commit entries")
        commit = self.hub.commit(repository, branch, added, deleted, title, lfs)
        self._send_json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.sha}",
                "pullRequestUrl": None,
            }
        )

    def _create_tag(self, repo: str, rev: str) -> None:
        repository = self._writable(repo)
        commit = self.hub.resolve(repository, rev)
        tag = self._json_body()["tag"]
        if tag in repository.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repository.tags[tag] = commit.sha
        self._send_json({})

    def _delete_tag(self, repo: str, tag: str) -> None:
        repository = self._writable(repo)
        if repository.tags.pop(tag, None) is None:
            raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        self._send_json({})

    def _create_branch(self, repo: str, branch: str) -> None:
        repository = self._writable(repo)
        if branch in repository.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = self._json_body().get("startingPoint") or "main"
        repository.branches[branch] = self.hub.resolve(repository, start).sha
        self._send_json({})

    def _delete_branch(self, repo: str, branch: str) -> None:
        repository = self._writable(repo)
        if branch == "main" or repository.branches.pop(branch, None) is None:
            raise HubError(400, f"cannot delete branch {branch}")
        self._send_json({})

    def _download(self, repo: str, rev: str, file: str) -> None:
        gate = self.hub.download_gate
        if gate is not None and self.command == "GET":
            gate.wait(60)
        with self.hub.lock:
            commit = self.hub.resolve(self._readable(repo), rev)
            if file not in commit.files:
                raise HubError(404, f"Entry not found: {file}", "EntryNotFound")
            data = commit.files[file]
            cut = self.command == "GET" and file in self.hub.cut_next_download
            if cut:
                self.hub.cut_next_download.discard(file)
            overflowing = file in self.hub.overflowing
            drop_after = self.hub.dropping.get(file)
        etag = sha256(data) if file in commit.lfs else git_blob_sha(data)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match and self.command == "GET" and drop_after is None:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        if cut:
            self._send_cut(status, body, headers, len(body) // 2)
        elif self.command == "GET" and drop_after is not None:
            self._send_cut(status, body, headers, drop_after)
        elif self.command == "GET" and overflowing:
            self._send_overflowing(body, headers)
        else:
            self._send(status, body, headers)

    def _send_cut(self, status: int, body: bytes, headers: dict[str, str], sent: int) -> None:
        """Promise the whole body, send its first ``sent`` bytes, and drop the connection."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:sent])
        self.wfile.flush()
        self.close_connection = True

    def _send_overflowing(self, body: bytes, headers: dict[str, str]) -> None:
        """Send the file and then zeros, with no length, until the client hangs up."""
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.write(body)
            while True:
                self.wfile.write(bytes(64 << 10))

    def _lfs_batch(self, repo: str) -> None:
        self._writable(repo)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "this test server only accepts LFS uploads")
        objects = []
        for item in body["objects"]:
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.hub.lfs_objects:
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-objects/{item['oid']}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{item['oid']}", "header": {}},
                }
            objects.append(answer)
        self._send_json({"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str) -> None:
        if sha256(self.body) != oid:
            raise HubError(400, f"uploaded bytes do not hash to {oid}")
        self.hub.lfs_objects[oid] = self.body
        self._send_json({})

    def _lfs_verify(self, oid: str) -> None:
        if oid not in self.hub.lfs_objects or self._json_body().get("size") != len(self.hub.lfs_objects[oid]):
            raise HubError(404, f"LFS object {oid} is missing")
        self._send_json({})


# -- hostile content ------------------------------------------------------------------------------


class _LeavesMarker:
    """Unpickled by a full unpickler, this creates the file ``path`` (``open(path, "w")``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def marker_pickle(marker: Path) -> bytes:
    """An ``adapter_model.bin`` that runs code (it creates ``marker``) if anything ever unpickles it."""
    return pickle.dumps({"base_model.model.lm_head.lora_A.weight": _LeavesMarker(marker)}, protocol=2)


def alias_bomb(levels: int = 9, width: int = 9) -> bytes:
    """A few hundred bytes of YAML that expand to ``width ** levels`` strings when aliases are followed."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return ("\n".join(lines) + "\n").encode()


def nan_weights(safetensors_bytes: bytes) -> bytes:
    """The same adapter weights with the first entry of every tensor set to NaN."""
    from safetensors.torch import load, save

    tensors = load(safetensors_bytes)
    for tensor in tensors.values():
        tensor.view(-1)[0] = float("nan")
    return save(tensors)
