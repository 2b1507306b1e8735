"""A small Hugging Face Hub-compatible server on loopback, for testing push and load-by-id over real HTTP.

It implements what huggingface_hub's `create_repo`, `upload_folder` (preupload, validate-yaml, the
plain LFS batch/upload/verify protocol, the NDJSON commit), `repo_info`, `list_repo_refs`,
`list_repo_tree`, `whoami` and `snapshot_download` / `hf_hub_download` (HEAD/GET resolve) need, and
nothing else. Xet storage is not implemented: tests turn the client's xet path off
(`huggingface_hub.constants.HF_HUB_DISABLE_XET`), so uploads take the LFS route.

Model and dataset repos are served alike, under the Hub's paths: `/api/models/alice/x`, `/alice/x/resolve/...`
for a model, `/api/datasets/alice/x`, `/datasets/alice/x/resolve/...` for a dataset (enough for
`datasets.load_dataset("alice/x")`: its info, a tree listing by folder, its files).

Repos live in a folder (`root`): file contents under `objects/` (LFS files by sha256, regular files by
git blob sha1) and the refs and commits in `repos.json`, keyed `alice/x` for a model and `datasets/alice/x`
for a dataset. Every request is recorded (method, path, query, headers, body) so a test can assert exactly
what arrived.

    with HubServer(tmp_path / "hub", tokens={"hf_secret": "alice"}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.png")  # what the Hub's default .gitattributes sends to LFS
LFS_MIN_SIZE = 10 << 20  # and any file from 10 MiB
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_key(repo_id: str, repo_type: str = "model") -> str:
    """Where a repo is stored: `alice/x` for a model, `datasets/alice/x` for a dataset (its Hub URL path)."""
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"the test hub serves model and dataset repos, not {repo_type!r}")
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Request:
    """One request as it arrived."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HubServer:
    """The server: `start()` runs uvicorn in a thread on 127.0.0.1 and a free port; `stop()` ends it."""

    root: Path
    tokens: dict[str, str] = field(default_factory=dict)  # token -> user name
    lfs_patterns: tuple[str, ...] = LFS_PATTERNS
    fail_commits: int = 0  # answer the next N commits with 500, after the LFS uploads (an interrupted push)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self):
        self.root = Path(self.root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._repos: dict[str, dict[str, Any]] = {}
        self._server = None
        self._thread = None
        self.url = ""

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> HubServer:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self._app(), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test hub server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- what tests read

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of `repo_id` at `revision`, as stored."""
        with self._lock:
            repo = self._repos[repo_key(repo_id, repo_type)]
            commit = repo["commits"][repo["branches"].get(revision, revision)]
            return {path: self._read(entry) for path, entry in commit["files"].items()}

    def repo(self, repo_id: str, repo_type: str = "model") -> dict[str, Any] | None:
        """The stored record of a repo (private flag, branches, commits), or None."""
        with self._lock:
            return json.loads(json.dumps(self._repos.get(repo_key(repo_id, repo_type))))

    def create_branch(self, repo_id: str, branch: str, start: str = "main", repo_type: str = "model") -> None:
        """A branch at `start`'s commit, made directly (the HTTP branch API is not implemented)."""
        with self._lock:
            repo = self._repos[repo_key(repo_id, repo_type)]
            repo["branches"][branch] = repo["branches"][start]
            self._save()

    def calls(self, method: str | None = None, contains: str = "") -> list[Request]:
        return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    # ---------------------------------------------------------------- storage

    def _read(self, entry: dict[str, Any]) -> bytes:
        return (self.root / "objects" / (entry["lfs"] or entry["oid"])).read_bytes()

    def _store(self, name: str, data: bytes) -> None:
        path = self.root / "objects" / name
        if not path.exists():
            path.write_bytes(data)

    def _save(self) -> None:
        (self.root / "repos.json").write_text(json.dumps(self._repos, indent=1))

    def _is_lfs(self, path: str, size: int) -> bool:
        return size >= LFS_MIN_SIZE or any(fnmatch.fnmatch(path, p) for p in self.lfs_patterns)

    def _commit(self, repo: dict[str, Any], branch: str, files: dict[str, Any], message: str) -> str:
        parent = repo["branches"].get(branch)
        seed = json.dumps([parent, message, sorted((p, f["oid"]) for p, f in files.items()), time.time_ns()])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo["commits"][oid] = {"parent": parent, "message": message, "files": files}
        repo["branches"][branch] = oid
        self._save()
        return oid

    # ---------------------------------------------------------------- HTTP

    def _app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        server = self

        def error(status: int, code: str | None, message: str, **headers: str) -> JSONResponse:
            extra = {"X-Error-Message": message, **headers}
            if code:
                extra["X-Error-Code"] = code
            return JSONResponse({"error": message}, status_code=status, headers=extra)

        def user_of(request) -> tuple[str | None, JSONResponse | None]:
            auth = request.headers.get("authorization", "")
            if not auth:
                return None, None
            token = auth.removeprefix("Bearer ").strip()
            if token not in server.tokens:
                return None, error(401, None, "Invalid credentials in Authorization header")
            return server.tokens[token], None

        def key_of(request) -> str:
            """The stored key of the repo named in the path (`/datasets/...` and `/api/datasets/...`: a dataset)."""
            repo_id = f"{request.path_params['ns']}/{request.path_params['name']}".removesuffix(".git")
            dataset = request.url.path.startswith(("/datasets/", "/api/datasets/"))
            return repo_key(repo_id, "dataset" if dataset else "model")

        def find(request, write: bool = False) -> tuple[dict[str, Any] | None, JSONResponse | None]:
            """The repo named in the path, if this caller may see it (and write to it)."""
            user, bad = user_of(request)
            if bad:
                return None, bad
            repo = server._repos.get(key_of(request))
            hidden = repo is None or (repo["private"] and user != repo["owner"])
            if hidden:
                return None, error(404, "RepoNotFound", "Repository not found")
            if write and user != repo["owner"]:
                return None, error(403, None, "You don't have the rights to write to this repo")
            return repo, None

        def revision_of(repo: dict[str, Any], revision: str) -> str | None:
            if revision in repo["branches"]:
                return repo["branches"][revision]
            return revision if revision in repo["commits"] else None

        def tree_entry(path: str, entry: dict[str, Any]) -> dict[str, Any]:
            """A file as the tree API describes it."""
            item = {"type": "file", "path": path, "size": entry["size"], "oid": entry["oid"]}
            if entry["lfs"]:
                pointer = lfs_pointer(entry["lfs"], entry["size"])
                item["lfs"] = {"oid": entry["lfs"], "size": entry["size"], "pointerSize": len(pointer)}
            return item

        def folders_of(files: dict[str, Any]) -> set[str]:
            """Every folder that holds a file, at any depth."""
            return {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}

        def folder_entry(path: str) -> dict[str, Any]:
            return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}

        async def record(request) -> None:
            body = await request.body()
            server.requests.append(
                Request(request.method, request.url.path, request.url.query, dict(request.headers), body)
            )

        async def whoami(request):
            await record(request)
            user, bad = user_of(request)
            if bad or user is None:
                return bad or error(401, None, "Invalid credentials in Authorization header")
            return JSONResponse({"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token"}})

        async def create_repo(request):
            await record(request)
            user, bad = user_of(request)
            if bad or user is None:
                return bad or error(401, None, "Invalid credentials in Authorization header")
            payload = json.loads(await request.body())
            owner = payload.get("organization") or user
            repo_type = payload.get("type") or "model"
            if repo_type not in ("model", "dataset"):
                return error(400, None, f"the test hub does not serve {repo_type} repos")
            key = repo_key(f"{owner}/{payload['name']}", repo_type)
            if owner != user:
                return error(
                    403, None, f"You don't have the rights to create a {repo_type} under the namespace {owner}"
                )
            with server._lock:
                if key in server._repos:
                    return JSONResponse(
                        {"error": f"You already created this {repo_type} repo", "url": f"{server.url}/{key}"},
                        status_code=409,
                    )
                repo = {"owner": owner, "private": payload.get("visibility") == "private", "branches": {}}
                repo["commits"] = {}
                server._repos[key] = repo
                server._store(git_blob_sha1(GITATTRIBUTES), GITATTRIBUTES)
                files = {".gitattributes": {"oid": git_blob_sha1(GITATTRIBUTES), "size": len(GITATTRIBUTES)}}
                files[".gitattributes"]["lfs"] = None
                server._commit(repo, "main", files, "initial commit")
            return JSONResponse({"url": f"{server.url}/{key}", "name": f"{owner}/{payload['name']}"})

        async def repo_info(request):
            await record(request)
            with server._lock:
                repo, bad = find(request)
                if bad:
                    return bad
                revision = request.path_params.get("rev", "main")
                sha = revision_of(repo, revision)
                if sha is None:
                    return error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                repo_id = f"{request.path_params['ns']}/{request.path_params['name']}"
                siblings = [{"rfilename": p} for p in sorted(repo["commits"][sha]["files"])]
                return JSONResponse(
                    {"id": repo_id, "sha": sha, "private": repo["private"], "siblings": siblings, "tags": []}
                )

        async def refs(request):
            await record(request)
            with server._lock:
                repo, bad = find(request)
                if bad:
                    return bad
                branches = [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                    for name, sha in repo["branches"].items()
                ]
            return JSONResponse({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

        async def tree(request):
            await record(request)
            with server._lock:
                repo, bad = find(request)
                if bad:
                    return bad
                # `{rev}/{folder}`: the revision is the longest leading part that names one (a branch may hold '/')
                parts = request.path_params["rev"].split("/")
                cuts = [i for i in range(len(parts), 0, -1) if revision_of(repo, "/".join(parts[:i]))]
                if not cuts:
                    return error(404, "RevisionNotFound", f"Invalid rev id: {request.path_params['rev']}")
                sha, folder = revision_of(repo, "/".join(parts[: cuts[0]])), "/".join(parts[cuts[0] :])
                files = repo["commits"][sha]["files"]
                prefix = folder + "/" if folder else ""
                if folder and folder not in folders_of(files):
                    return error(404, "EntryNotFound", f"{folder} does not exist on {request.path_params['rev']}")
                recursive = request.query_params.get("recursive", "").lower() == "true"
                entries = [
                    tree_entry(path, files[path]) if path in files else folder_entry(path)
                    for path in sorted(set(files) | folders_of(files))
                    if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])
                ]
            return JSONResponse(entries)

        async def validate_yaml(request):
            await record(request)
            import yaml

            content = json.loads(await request.body())["content"]
            if not content.startswith("---\n"):
                return JSONResponse({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
            try:
                meta = yaml.safe_load(content.split("---\n", 2)[1])
            except yaml.YAMLError as e:
                return JSONResponse({"errors": [{"message": str(e)}], "warnings": []}, status_code=400)
            if not isinstance(meta, dict):
                return JSONResponse({"errors": [{"message": "metadata must be a mapping"}]}, status_code=400)
            return JSONResponse({"errors": [], "warnings": []})

        async def preupload(request):
            await record(request)
            payload = json.loads(await request.body())
            with server._lock:
                repo, bad = find(request, write=True)
                if bad:
                    return bad
                sha = revision_of(repo, request.path_params["rev"])
                if sha is None:
                    return error(404, "RevisionNotFound", f"Invalid rev id: {request.path_params['rev']}")
                current = repo["commits"][sha]["files"]
                out = []
                for f in payload["files"]:
                    lfs = server._is_lfs(f["path"], f["size"])
                    entry = current.get(f["path"])
                    # The oid the client compares with its own: sha256 for LFS files, git sha1 for regular ones.
                    oid = None if entry is None else (entry["lfs"] or entry["oid"])
                    mode = "lfs" if lfs else "regular"
                    out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            return JSONResponse({"files": out, "commitOid": sha})

        async def lfs_batch(request):
            await record(request)
            payload = json.loads(await request.body())
            with server._lock:
                repo, bad = find(request, write=True)
                if bad:
                    return bad
                repo_id = f"{request.path_params['ns']}/{request.path_params['name']}".removesuffix(".git")
            objects = []
            for obj in payload["objects"]:
                item = {"oid": obj["oid"], "size": obj["size"]}
                if not (server.root / "objects" / obj["oid"]).exists():
                    item["actions"] = {
                        "upload": {"href": f"{server.url}/_lfs/{repo_id}/{obj['oid']}"},
                        "verify": {"href": f"{server.url}/_lfs/{repo_id}/verify"},
                    }
                objects.append(item)
            return JSONResponse({"transfer": "basic", "objects": objects})

        async def lfs_put(request):
            await record(request)
            data = await request.body()
            oid = request.path_params["oid"]
            if hashlib.sha256(data).hexdigest() != oid:
                return error(400, None, "content does not match its oid")
            with server._lock:
                server._store(oid, data)
            return Response(status_code=200)

        async def lfs_verify(request):
            await record(request)
            payload = json.loads(await request.body())
            path = server.root / "objects" / payload["oid"]
            if not path.exists() or path.stat().st_size != payload["size"]:
                return error(404, None, "object not found")
            return JSONResponse({"ok": True})

        async def commit(request):
            await record(request)
            body = await request.body()
            with server._lock:
                repo, bad = find(request, write=True)
                if bad:
                    return bad
                branch = request.path_params["rev"]
                if branch not in repo["branches"]:
                    return error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
                if server.fail_commits > 0:
                    server.fail_commits -= 1
                    return error(500, None, "Internal Error: the commit was interrupted")
                files = dict(repo["commits"][repo["branches"][branch]]["files"])
                message = ""
                for line in body.splitlines():
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "header":
                        message = value["summary"]
                    elif key == "file":
                        data = base64.b64decode(value["content"])
                        oid = git_blob_sha1(data)
                        server._store(oid, data)
                        files[value["path"]] = {"oid": oid, "size": len(data), "lfs": None}
                    elif key == "lfsFile":
                        if not (server.root / "objects" / value["oid"]).exists():
                            return error(400, None, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                        pointer = lfs_pointer(value["oid"], value["size"])
                        files[value["path"]] = {"oid": git_blob_sha1(pointer), "size": value["size"]}
                        files[value["path"]]["lfs"] = value["oid"]
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                    else:
                        return error(400, None, f"unsupported commit operation {key}")
                sha = server._commit(repo, branch, files, message)
            return JSONResponse(
                {"success": True, "commitOid": sha, "commitUrl": f"{server.url}/{key_of(request)}/commit/{sha}"}
            )

        async def resolve(request):
            await record(request)
            with server._lock:
                repo, bad = find(request)
                if bad:
                    return bad
                sha = revision_of(repo, request.path_params["rev"])
                if sha is None:
                    return error(404, "RevisionNotFound", f"Invalid rev id: {request.path_params['rev']}")
                entry = repo["commits"][sha]["files"].get(request.path_params["path"])
                if entry is None:
                    return error(404, "EntryNotFound", "Entry not found", **{"X-Repo-Commit": sha})
                data = server._read(entry)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
            if entry["lfs"]:
                headers["X-Linked-Etag"] = f'"{entry["lfs"]}"'
                headers["X-Linked-Size"] = str(entry["size"])
            start = 0
            ranged = request.headers.get("range", "")
            if ranged.startswith("bytes=") and ranged.endswith("-"):
                start = int(ranged[6:-1])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(data))
                return Response(status_code=200, headers=headers)
            return Response(data[start:], status_code=206 if start else 200, headers=headers)

        repo = "/{ns}/{name}"
        routes = [
            Route("/api/whoami-v2", whoami),
            Route("/api/repos/create", create_repo, methods=["POST"]),
            Route("/api/validate-yaml", validate_yaml, methods=["POST"]),
            Route(f"/_lfs{repo}/verify", lfs_verify, methods=["POST"]),
            Route(f"/_lfs{repo}/{{oid}}", lfs_put, methods=["PUT"]),
        ]
        # The same routes for both kinds of repo: a model's pages are /alice/x, a dataset's /datasets/alice/x.
        for kinds, web in (("models", ""), ("datasets", "/datasets")):
            routes += [
                Route(f"/api/{kinds}{repo}", repo_info),
                Route(f"/api/{kinds}{repo}/revision/{{rev:path}}", repo_info),
                Route(f"/api/{kinds}{repo}/refs", refs),
                Route(f"/api/{kinds}{repo}/tree/{{rev:path}}", tree),
                Route(f"/api/{kinds}{repo}/preupload/{{rev:path}}", preupload, methods=["POST"]),
                Route(f"/api/{kinds}{repo}/commit/{{rev:path}}", commit, methods=["POST"]),
                Route(f"{web}{repo}/info/lfs/objects/batch", lfs_batch, methods=["POST"]),
                Route(f"{web}{repo}/resolve/{{rev}}/{{path:path}}", resolve, methods=["GET", "HEAD"]),
            ]

        async def not_found(request, exc):
            await record(request)
            return error(404, None, f"the test hub does not implement {request.method} {request.url.path}")

        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
