"""`qtune studio`: the Starlette app (the page, the JSON API, the playground's /v1/ routes) behind one guard.

    qtune studio                      # http://127.0.0.1:7860/#token=<random>, this folder only
    qtune studio --host 0.0.0.0 --token SECRET

The guard (docs/studio.md, Security) runs before every route: the Host header must name the bound address (DNS
rebinding), an Origin must be this server, a state-changing request must be JSON (a form post from another site
cannot be), and every /api/ and /v1/ request needs the token (a random one unless --token or --no-token). The page
itself (/ and /static/) is served without it: it holds no data, and it must load to read the token from the URL.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from qtune import __version__
from qtune.errors import ConfigError
from qtune.serve.app import check_server_launch, is_loopback
from qtune.studio import adapters, plan, playground, runs
from qtune.studio import configs as config_routes
from qtune.studio.common import Studio, api

if TYPE_CHECKING:
    from starlette.applications import Starlette

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
STATIC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def _hostname(value: str) -> str:
    """The host part of a Host header or an Origin's netloc, lowercased, IPv6 brackets removed."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _allowed_hosts(host: str) -> set[str] | None:
    """The names a request's Host header may carry; None (no check) when bound to every interface, where the
    required token is what keeps other sites out."""
    host = host.strip().strip("[]").lower()
    if host in WILDCARD_HOSTS:
        return None
    return {host} | (LOOPBACK_HOSTS if is_loopback(host) else set())


class Guard:
    """The ASGI guard around the studio: refuses what docs/studio.md's Security section refuses, adds the security
    headers to every response, and hands /v1/ requests to the playground."""

    def __init__(self, app, studio: Studio, forward) -> None:
        self.app, self.studio, self.forward = app, studio, forward
        self.hosts = _allowed_hosts(studio.host)

    def _refusal(self, scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.hosts is not None and _hostname(host) not in self.hosts:
            return 403, f"Host {host!r} is not this studio's address ({self.studio.host}): refused (DNS rebinding)"
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
                return 403, f"Origin {origin!r} is another site: refused"
        path = scope.get("path", "")
        if self.studio.token and path.startswith(("/api/", "/v1/")):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self.studio.token.encode()
            ):
                return 401, "this studio needs its token: Authorization: Bearer <token> (open the page as /#token=...)"
        if scope.get("method") in STATE_CHANGING:
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return 415, f"{scope['method']} requests must be Content-Type: application/json, got {media or 'none'}"
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            from starlette.responses import JSONResponse

            status, message = refusal
            extra = {"www-authenticate": "Bearer"} if status == 401 else None
            response = JSONResponse({"error": {"message": message, "field": None}}, status_code=status, headers=extra)
            await response(scope, receive, send_with_headers)
            return
        target = self.forward if scope.get("path", "").startswith("/v1/") else self.app
        await target(scope, receive, send_with_headers)


def create_studio_app(studio: Studio) -> Starlette:
    """The studio's ASGI app: the page, the JSON API and the playground's /v1/ routes, behind the Guard
    (start it with uvicorn, or qtune.serve.app.ServerThread in tests)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Route

    async def info(request):
        return JSONResponse(
            {
                "project": str(studio.project),
                "dir": studio.relative(studio.dir),
                "version": __version__,
                "token_required": bool(studio.token),
            }
        )

    def static_file(name: str):
        path = STATIC / name
        if not STATIC_NAME.fullmatch(name) or path.suffix not in STATIC_TYPES or not path.is_file():
            return JSONResponse({"error": {"message": f"no page file {name!r}", "field": None}}, status_code=404)
        return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers={"cache-control": "no-cache"})

    async def page(request):
        return static_file("index.html")

    async def static(request):
        return static_file(request.path_params["file"])

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        detail = getattr(exc, "detail", "") or "not found"
        message = f"{request.method} {request.url.path}: {detail}"
        return JSONResponse({"error": {"message": message, "field": None}}, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            playground.close(studio)

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/static/{file:path}", static, methods=["GET"]),
        Route("/api/info", api(info), methods=["GET"]),
        *config_routes.routes(studio),
        *runs.routes(studio),
        *plan.routes(studio),
        *adapters.routes(studio),
        *playground.routes(studio),
    ]
    guard = Middleware(Guard, studio=studio, forward=playground.forward(studio))
    handlers = {404: not_found, 405: not_found}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers, middleware=[guard])
    app.state.studio = studio
    return app


def run_studio(
    project: Path,
    dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    token: str | None = None,
    no_token: bool = False,
    base: str | None = None,
    quant: str = "nf4",
    dtype: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve the studio for `project` until interrupted (what `qtune studio` runs).

    Args:
        project: the folder the studio reads and writes in (never outside it).
        dir: the runs' and adapters' folder (output.dir), relative to `project`; created if missing.
        host, port: where to listen; beyond loopback a token is required (`no_token` is for loopback only).
        token: the bearer token every /api/ and /v1/ request needs; None: a random one, printed in the page's URL
            (so that other users and processes on this machine cannot drive the studio).
        no_token: no token at all (loopback only): anything on this machine may use the studio.
        base, quant, dtype: the playground's base model and how it is loaded.
    """
    if token and no_token:
        raise ConfigError("--no-token and --token (or QTUNE_STUDIO_TOKEN) exclude each other: give one")
    if not token and not no_token:
        token = secrets.token_urlsafe(16)
    check_server_launch(
        "studio",
        host,
        token,
        "QTUNE_STUDIO_TOKEN",
        "only someone holding it can start runs and read your data (--no-token is for loopback only)",
    )
    import uvicorn

    project = Path(project).resolve()
    try:
        folder = (project / Path(dir).expanduser()).resolve()
    except RuntimeError as e:
        raise ConfigError(f"--dir {dir}: cannot resolve it ({e}); give a folder inside {project}") from None
    if not folder.is_relative_to(project):
        raise ConfigError(f"--dir {dir}: {folder} is outside the project folder {project}; give a folder inside it")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--dir {dir}: {folder} is a file; give a folder")
    try:
        missing = base and base.startswith((".", "/", "~")) and not (project / Path(base).expanduser()).is_dir()
    except RuntimeError:  # ~nosuchuser
        missing = True
    if missing:
        raise ConfigError(f"--base {base}: no such model folder; give a model folder, or a built-in name")
    folder.mkdir(parents=True, exist_ok=True)
    studio = Studio(project=project, dir=folder, token=token, host=host, base=base, quant=quant, dtype=dtype)
    app = create_studio_app(studio)
    try:
        shown = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        shown = host
    print(f"qtune studio for {project} (runs and adapters in {studio.relative(folder)}/)", flush=True)
    print(f"open http://{shown}:{port}/" + (f"#token={token}" if token else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
