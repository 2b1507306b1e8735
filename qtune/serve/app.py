"""`qtune serve`: an OpenAI-compatible HTTP server over an AdapterPool (Starlette on uvicorn).

    qtune serve --base smollm2-135m --adapters adapters/ --port 8000

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (`model` is "base" or an
adapter name; `stream: true` sends server-sent events), POST /v1/classify (classification adapters),
POST /admin/adapters and DELETE /admin/adapters/{name} (a bearer token is required whenever one is
set, and the server refuses to listen beyond loopback without one), GET /health.

One worker thread owns the model and batches the requests (serve/scheduler.py); the request checks
and the OpenAI response shapes are in serve/openai_api.py. A client that disconnects cancels its
row, which leaves the batch at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import math
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from qtune import DISTRIBUTION
from qtune.errors import USER_ERRORS, AdapterError, ConfigError, MissingExtraError
from qtune.meta import CLASSIFIER
from qtune.serve.decode import Row
from qtune.serve.openai_api import (
    Limits,
    RequestError,
    check_model,
    choice,
    error_response,
    model_entry,
    parse_json,
    read_body,
    read_completion,
    sse,
    usage,
)
from qtune.serve.pool import AdapterPool
from qtune.serve.scheduler import Scheduler

if TYPE_CHECKING:
    from starlette.applications import Starlette

LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    """Does binding to `host` keep the server on this machine?"""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- the app


def create_app(
    pool: AdapterPool,
    *,
    token: str | None = None,
    limits: Limits | None = None,
    max_batch: int = 16,
    batch_wait_ms: float = 5.0,
    prefill_chunk: int | None = 512,
) -> Starlette:
    """The Starlette app serving `pool` (start it with uvicorn, or ServerThread in tests).

    Args:
        pool: the base and adapters to serve; the app's worker thread runs every model call on it.
        token: bearer token the admin routes require; None leaves them open (loopback only: see serve()).
        limits: per-request limits (max_tokens, prompt length, body size, time budget).
        max_batch: most rows decoded together.
        batch_wait_ms: how long the first request of a batch waits for company.
        prefill_chunk: a longer prompt is prefilled this many tokens at a time between two decoding steps.

    The event loop only moves bytes: parsing, checking and tokenizing a request run on a small thread pool,
    and the model on the scheduler's worker thread, so one large request never stalls /health or a stream.

    `app.state.scheduler.steps` records the adapters of the rows of every forward pass, and
    `.finished` each row's (adapter, finish_reason, tokens): what the tests check batching with.
    """
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    limits = limits or Limits()
    scheduler = Scheduler(pool, max_batch=max_batch, batch_wait_ms=batch_wait_ms, prefill_chunk=prefill_chunk)
    workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qtune-serve-request")

    async def off_loop(fn):
        return await asyncio.get_running_loop().run_in_executor(workers, fn)

    async def json_body(request) -> dict:
        raw = await read_body(request, limits.max_body_bytes)
        return await off_loop(lambda: parse_json(raw))

    async def wait_disconnect(request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.02)

    async def complete(request, chat: bool):
        arrived = time.monotonic()
        raw = await read_body(request, limits.max_body_bytes)
        body, model, prompt, sampling = await off_loop(lambda: read_completion(pool, limits, raw, chat))
        deadline = arrived + limits.timeout_s if limits.timeout_s else None
        row = Row(model, prompt, sampling, deadline=deadline)
        stream = body.get("stream") is True
        include_usage = (
            stream and isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        )
        job = scheduler.submit_generation(row, stream)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        if not stream:
            watcher = asyncio.ensure_future(wait_disconnect(request))
            try:
                while True:
                    getter = asyncio.ensure_future(job.events.get())
                    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():  # the client left: free its slot
                        getter.cancel()
                        row.cancelled = True
                        return error_response(499, "client disconnected")
                    kind, value = getter.result()
                    if kind == "error":
                        return error_response(*failure(row, value))
                    if kind == "done":
                        break
            finally:
                watcher.cancel()
            body = {"id": rid, "object": obj, "created": created, "model": model}
            answer = choice(row.text, row.finish_reason, chat=chat, stream=False)
            return JSONResponse({**body, "choices": [answer], "usage": usage(len(prompt), len(row.tokens))})

        async def events():
            head = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": model}
            try:
                if chat:
                    yield sse({**head, "choices": [choice(None, None, chat=chat, stream=True, first=True)]})
                while True:
                    kind, value = await job.events.get()
                    if kind == "delta":
                        yield sse({**head, "choices": [choice(value, None, chat=chat, stream=True)]})
                    elif kind == "error":
                        _, message, _, code = failure(row, value)
                        yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
                        break
                    else:
                        yield sse({**head, "choices": [choice(None, row.finish_reason, chat=chat, stream=True)]})
                        if include_usage:
                            yield sse({**head, "choices": [], "usage": usage(len(prompt), len(row.tokens))})
                        break
                yield "data: [DONE]\n\n"
            finally:  # normal end, or the client went away (Starlette cancels this generator)
                if row.finish_reason is None:
                    row.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def failure(row: Row, message: str) -> tuple[int, str, None, str | None]:
        """The status, message and code of a row that ended in an error (a 504 past the time budget)."""
        if row.finish_reason == "timeout":
            return 504, f"{message} ({limits.timeout_s:g} s, --request-timeout)", None, "timeout"
        return 500, message, None, None

    async def classify(request):
        body = await json_body(request)
        model = check_model(pool, body, CLASSIFIER)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise RequestError(400, "`input` must be a non-empty string or a list of them", "input")
        if len(texts) > 256:
            raise RequestError(400, f"`input` takes at most 256 texts per request, got {len(texts)}", "input")
        adapters = [model] * len(texts)
        results = await scheduler.call(lambda: pool.classify(adapters, texts), classify=(adapters, texts))
        data = [{"index": i, "object": "classification", **r} for i, r in enumerate(results)]
        return JSONResponse({"object": "list", "model": model, "data": data})

    async def models(request):
        skipped = [{"id": name, "reason": reason} for name, reason in pool.skipped.items()]
        return JSONResponse(
            {"object": "list", "data": [model_entry(pool, n) for n in pool.names()], "skipped": skipped}
        )

    def authorize(request) -> None:
        if token is None:
            return  # only possible on loopback: serve() refuses to bind further without a token
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise RequestError(401, "admin routes need `Authorization: Bearer <token>` (the --token of qtune serve)")

    async def load_adapter(request):
        authorize(request)
        body = await json_body(request)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise RequestError(400, "give `name` (the model name clients will use) and `path` (an adapter folder)")
        if name in pool.adapters:
            raise RequestError(409, f"an adapter named {name!r} is already loaded; DELETE it first", "name")
        try:
            await scheduler.call(lambda: pool.add(name, path))
        except USER_ERRORS as e:  # not only AdapterError: a qtune.json whose base moved is a ModelError
            raise RequestError(400, str(e)) from None
        return JSONResponse(model_entry(pool, name), status_code=201)

    async def unload_adapter(request):
        authorize(request)
        name = request.path_params["name"]
        if name not in pool.adapters:
            raise RequestError(404, f"no adapter named {name!r}; loaded: {', '.join(pool.adapters) or 'none'}")
        try:
            await scheduler.call(lambda: pool.remove(name))
        except AdapterError as e:
            raise RequestError(409, str(e)) from None
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    async def health(request):
        return JSONResponse({"status": "ok"})

    def guarded(handler):
        async def endpoint(request):
            try:
                return await handler(request)
            except RequestError as e:
                return error_response(e.status, e.message, e.param, e.code)
            except USER_ERRORS as e:  # a qtune error the route did not expect: still the client's, with its reason
                return error_response(400, str(e))
            except Exception as e:  # a bug: the client gets a JSON 500 with the reason, the server stays up
                return error_response(500, f"internal error: {type(e).__name__}: {e}")

        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            workers.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/chat/completions", guarded(lambda r: complete(r, chat=True)), methods=["POST"]),
        Route("/v1/completions", guarded(lambda r: complete(r, chat=False)), methods=["POST"]),
        Route("/v1/classify", guarded(classify), methods=["POST"]),
        Route("/admin/adapters", guarded(load_adapter), methods=["POST"]),
        Route("/admin/adapters/{name:path}", guarded(unload_adapter), methods=["DELETE"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.pool = pool
    return app


# ---------------------------------------------------------------- running it


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, benchmarks): `with ServerThread(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="qtune-serve-http", daemon=True)
        self.host = host

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def check_server_launch(verb: str, host: str, token: str | None, token_env: str, protects: str) -> None:
    """What `qtune serve` and `qtune studio` check before they listen: their extra is installed (starlette and
    uvicorn), and a `host` beyond loopback has a token.

    Args:
        verb: the command (`serve`, `studio`): its extra has the same name.
        host, token: where it would listen, and the bearer token it would require.
        token_env: the environment variable the token may come from instead of --token.
        protects: what the token keeps from other machines, as the end of a sentence.

    Raises:
        MissingExtraError: starlette or uvicorn is missing.
        ConfigError: `host` is reachable from other machines and there is no token.
    """
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(
            f"qtune {verb} needs {e.name or 'starlette and uvicorn'}: pip install '{DISTRIBUTION}[{verb}]'"
        ) from None
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"--host {host} is reachable from other machines: set --token (or {token_env}) so that {protects}"
        )


def serve(
    base: str,
    adapters_dir: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    quant: str = "nf4",
    dtype: str | None = None,
    token: str | None = None,
    max_adapters: int = 8,
    max_adapter_memory: str | None = None,
    max_batch: int = 16,
    max_tokens_limit: int = 512,
    max_prompt_tokens: int | None = None,
    max_body: str = "4MB",
    request_timeout: float = 300.0,
    prefill_chunk: int = 512,
    log_level: str = "info",
) -> None:
    """Load the base and the adapters under `adapters_dir`, then serve until interrupted (what `qtune serve` runs).

    Args:
        base: 'smollm2-135m', a local HF model folder, or a hub id.
        adapters_dir: a folder whose subfolders are adapter folders; each is served under its folder name.
        host, port: where to listen; beyond loopback a `token` is required.
        quant, dtype: how the base is stored and computes (see AdapterPool).
        token: bearer token the admin routes require (all admin requests need it once set).
        max_adapters, max_adapter_memory: the residency bound (count; weights size such as "512MB").
        max_batch: most rows decoded together.
        max_tokens_limit, max_prompt_tokens: per-request limits; over them is a 400.
        max_body: the largest request body read (e.g. "4MB"); over it is a 413.
        request_timeout: seconds from a request's arrival to its last token; past it is a 504 (0: no limit).
        prefill_chunk: longer prompts are prefilled this many tokens at a time between decoding steps.

    An adapter folder under `adapters_dir` that cannot be served (truncated weights, a bad qtune.json, another
    base) is skipped with its reason in the log and in GET /v1/models; the others are served.
    """
    check_server_launch(
        "serve", host, token, "QTUNE_SERVE_TOKEN", "the admin routes that load and unload adapters are protected"
    )
    import uvicorn

    from qtune.errors import ModelError, PlanError
    from qtune.plan import parse_bytes

    checks = (("--max-batch", max_batch), ("--max-tokens-limit", max_tokens_limit), ("--prefill-chunk", prefill_chunk))
    for flag, value in checks:
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if not math.isfinite(request_timeout) or request_timeout < 0:
        raise ConfigError(f"--request-timeout must be a number of seconds >= 0 (0: no limit), got {request_timeout}")

    def size(flag: str, text: str) -> int:
        try:
            return parse_bytes(text)
        except PlanError:
            raise ConfigError(f"{flag}: cannot read {text!r}; use e.g. 512MB or 2GB") from None

    budget = size("--max-adapter-memory", max_adapter_memory) if max_adapter_memory else None
    body_limit = size("--max-body", max_body)
    if adapters_dir is not None and not Path(adapters_dir).is_dir():
        raise AdapterError(f"--adapters: {adapters_dir} is not a folder (give the folder that holds adapter folders)")
    try:
        pool = AdapterPool(base, quant=quant, dtype=dtype, max_adapters=max_adapters, max_adapter_bytes=budget)
    except ModelError as e:  # resolve_base speaks of the config key; here the flag is --base
        raise ModelError(str(e).replace("model.name:", "--base:", 1)) from None
    names = pool.add_folder(adapters_dir) if adapters_dir is not None else []
    for name, reason in pool.skipped.items():
        print(f"skipped adapter {name}: {reason}", flush=True)
    print(f"serving {pool.base_path} ({quant}) with adapters: {', '.join(names) or 'none'}", flush=True)
    limits = Limits(
        max_tokens=max_tokens_limit,
        max_prompt_tokens=max_prompt_tokens,
        max_body_bytes=body_limit,
        timeout_s=request_timeout or None,
    )
    app = create_app(pool, token=token, limits=limits, max_batch=max_batch, prefill_chunk=prefill_chunk)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
