"""The playground: one base and the project's adapters in an AdapterPool, answering through qtune serve's own
OpenAI-compatible routes (create_app) from the studio's process.

The base loads on the first POST /api/playground/load, in a background thread (the page polls
GET /api/playground). Each later POST registers the adapters trained since. Every change to the pool runs on
the serve app's scheduler thread, between batches, so it never races a generation."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from qtune.errors import USER_ERRORS, AdapterError
from qtune.meta import CAUSAL_LM
from qtune.models import EMBEDDED_ALIAS, ENCODER_ALIAS, is_hub_id
from qtune.studio.adapters import adapter_folders, kind_of, read_adapters
from qtune.studio.common import ApiError, Studio, api, inside

MAX_ADAPTERS = 8
MAX_TOKENS = 256  # the page asks for short answers; a longer request is a 400 naming the limit
SERVED = ("/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/models")  # never qtune serve's /admin
NOT_LOADED = "the playground is not loaded: POST /api/playground/load"


def _reason(e: BaseException) -> str:
    text = str(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {e}"
    return " ".join(text.split()) or type(e).__name__


def _hub_id(studio: Studio, name: str) -> bool:
    """Does qtune take `name` for a hub id (qtune.models.resolve_base's rule, with the project folder as the working
    folder): shaped 'org/model' and nothing of that name there. Anything else but an embedded alias is local."""
    return is_hub_id(name) and not (studio.project / name).exists()


def choose_base(studio: Studio) -> str:
    """The playground's base: --base, else the base of the newest causal-LM qtune adapter, else the embedded model.

    A local base recorded by an adapter must lie inside the project folder (the studio reads nothing outside it)."""
    if studio.base:  # the user's --base; a relative folder is the project's (the studio may run elsewhere)
        here = studio.project / Path(studio.base).expanduser()
        return str(here.resolve()) if here.is_dir() else studio.base
    read, _ = read_adapters(studio)  # newest first; a plain PEFT folder records no qtune config: not a candidate
    name = next((meta.config.model.name for _, meta in read if meta and meta.kind == CAUSAL_LM), EMBEDDED_ALIAS)
    if name in (EMBEDDED_ALIAS, ENCODER_ALIAS) or _hub_id(studio, name):
        return name  # qtune's own model, or a hub id (from the hub cache; HF_HUB_OFFLINE as the user set it)
    try:
        return str(inside(studio, name, "the newest adapter's base"))
    except ApiError as e:
        raise ApiError(400, f"{e.message}: start the studio with --base") from None


class Playground:
    """The pool and the serve app once loaded; `state` says where loading stands."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.state = "idle"  # idle | loading | ready | failed
        self.base: str | None = None
        self.error: str | None = None
        self.pool: Any = None
        self.app: Any = None
        self._lock = threading.Lock()

    # -- loading

    def start(self) -> bool:
        """Start loading in a background thread unless loading or loaded; True if it started."""
        with self._lock:
            if self.state in ("loading", "ready"):
                return False
            self.state, self.error = "loading", None
        threading.Thread(target=self._load, name="qtune-studio-playground", daemon=True).start()
        return True

    def _load(self) -> None:
        from qtune.serve.app import create_app
        from qtune.serve.openai_api import Limits
        from qtune.serve.pool import AdapterPool

        studio = self.studio
        try:
            self.base = choose_base(studio)
            self.pool = AdapterPool(self.base, quant=studio.quant, dtype=studio.dtype, max_adapters=MAX_ADAPTERS)
            # Not pool.add_folder: the playground serves exactly the folders the adapter list shows (a push dry
            # run's <name>.hub copy is not an adapter of its own). The scheduler is not running yet: no race.
            self._sync()
            app = create_app(self.pool, limits=Limits(max_tokens=MAX_TOKENS, default_max_tokens=MAX_TOKENS))
            app.state.scheduler.start()  # not through the app's lifespan: the studio's own lifespan owns this app
        except ApiError as e:
            self._fail(e.message)
        except Exception as e:  # noqa: BLE001 - whatever stops the load, the page shows it in one line
            self._fail(_reason(e))
        else:
            with self._lock:
                self.app, self.state = app, "ready"

    def _fail(self, reason: str) -> None:
        with self._lock:
            self.state, self.error, self.pool = "failed", reason, None

    def _sync(self) -> None:
        """On the scheduler thread: register adapter folders that appeared, forget those that went."""
        pool = self.pool
        present = {p.name: p for p in adapter_folders(self.studio)}
        for name in [n for n in pool.adapters if n not in present]:
            try:
                pool.remove(name)
            except AdapterError:
                pass  # in use by a running batch: forgotten on a later refresh
        for name in [n for n in pool.skipped if n not in present]:
            del pool.skipped[name]
        for name, path in present.items():
            if name in pool.adapters:
                continue
            try:  # a skipped folder is tried again: it may have been trained again since
                pool.add(name, path, load=False)
            except Exception as e:  # noqa: BLE001 - one bad folder does not keep the others out
                pool.skipped[name] = _reason(e)
            else:
                pool.skipped.pop(name, None)

    async def refresh(self) -> None:
        """When ready: bring the pool up to date with the output folder; else start loading."""
        if self.state == "ready":
            await self.app.state.scheduler.call(self._sync)
        else:
            self.start()

    async def forget(self, name: str) -> None:
        """Drop an adapter from the pool before its folder goes (an AdapterError while a generation uses it)."""
        if self.state != "ready":
            return
        pool = self.pool

        def drop() -> None:
            pool.skipped.pop(name, None)
            if name in pool.adapters:
                pool.remove(name)

        await self.app.state.scheduler.call(drop)

    def close(self) -> None:
        if self.app is not None:
            self.app.state.scheduler.stop()

    # -- what the page sees

    def status(self) -> dict[str, Any]:
        models, skipped = [], []
        if self.state == "ready":
            pool = self.pool
            models.append({"id": "base", "kind": "causal_lm", "system_prompt": None})
            for name, info in list(pool.adapters.items()):
                models.append({"id": name, "kind": kind_of(info.kind), "system_prompt": info.system_prompt})
            skipped = [{"name": n, "reason": r} for n, r in list(pool.skipped.items())]
        return {"state": self.state, "base": self.base, "error": self.error, "models": models, "skipped": skipped}


def _playground(studio: Studio) -> Playground:
    if studio.playground is None:
        studio.playground = Playground(studio)
    return studio.playground


def routes(studio: Studio) -> list:
    """GET /api/playground and POST /api/playground/load."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def status(request):
        playground = studio.playground
        if playground is None:
            return JSONResponse({"state": "idle", "base": None, "error": None, "models": [], "skipped": []})
        return JSONResponse(playground.status())

    async def load(request):
        playground = _playground(studio)
        await playground.refresh()
        return JSONResponse(playground.status(), status_code=202)

    return [
        Route("/api/playground", api(status), methods=["GET"]),
        Route("/api/playground/load", api(load), methods=["POST"]),
    ]


def forward(studio: Studio):
    """The ASGI app for /v1/...: qtune serve's completions, classification and model list, once loaded."""
    from starlette.responses import JSONResponse

    async def app(scope, receive, send) -> None:
        playground = studio.playground
        if scope["type"] != "http":
            return
        if scope["path"] not in SERVED:
            error = {"message": f"no route {scope['path']}; the playground serves {', '.join(SERVED)}", "field": None}
            await JSONResponse({"error": error}, status_code=404)(scope, receive, send)
        elif playground is None or playground.state != "ready":
            await JSONResponse({"error": {"message": NOT_LOADED, "field": None}}, status_code=503)(scope, receive, send)
        else:
            await playground.app(scope, receive, send)

    return app


def close(studio: Studio) -> None:
    """Stop the playground's scheduler thread (the studio is shutting down)."""
    if studio.playground is not None:
        studio.playground.close()
