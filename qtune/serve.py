"""`qtune serve`: an OpenAI-compatible HTTP server over an AdapterPool (Starlette on uvicorn).

    qtune serve --base smollm2-135m --adapters adapters/ --port 8000

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (`model` is "base" or an
adapter name; `stream: true` sends server-sent events), POST /v1/classify (classification adapters),
POST /admin/adapters and DELETE /admin/adapters/{name} (a bearer token is required whenever one is
set, and the server refuses to listen beyond loopback without one), GET /health.

One worker thread owns the model. Requests wait in a queue; the worker takes every waiting request
(up to `max_batch` rows over at most `pool.max_adapters` adapters, after waiting `batch_wait_ms` for
company) and decodes them as one mixed-adapter batch (AdapterPool.generate), streaming each row's
text back to its request as it grows. Between two decoding steps, requests that arrived meanwhile
join the running batch (continuous batching) while there is room; rows leave as soon as they finish.
Loading, unloading and classification run between batches: while one waits, no new row joins, so
the running batch drains. A client that disconnects cancels its row, which leaves at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtune.errors import AdapterError, ConfigError
from qtune.pool import BASE, AdapterPool, Row, Sampling

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


class RequestError(Exception):
    """A request the server refuses: its HTTP status and the message the client sees."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# ---------------------------------------------------------------- the scheduler


@dataclass
class _Generation:
    row: Row
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("delta", text) ... then ("done", None) or ("error", message)
    stream: bool


@dataclass
class _Call:
    """Anything else the worker must run between batches (classification, loading, unloading)."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    classify: tuple[list[str], list[str]] | None = None  # (adapters, texts): merged with other classify calls


@dataclass
class Scheduler:
    """The single thread that runs the model, and the queue that feeds it."""

    pool: AdapterPool
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    steps: deque = field(default_factory=lambda: deque(maxlen=100_000))  # adapters of the rows of each forward pass
    finished: deque = field(default_factory=lambda: deque(maxlen=10_000))  # (adapter, finish_reason, tokens)

    def __post_init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._pending: deque = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qtune-serve-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- called from the event loop

    def submit_generation(self, row: Row, stream: bool) -> _Generation:
        job = _Generation(row, asyncio.get_running_loop(), asyncio.Queue(), stream)
        self._queue.put(job)
        return job

    async def call(self, fn: Callable[[], Any], classify: tuple[list[str], list[str]] | None = None) -> Any:
        loop = asyncio.get_running_loop()
        job = _Call(fn, loop, loop.create_future(), classify)
        self._queue.put(job)
        return await job.future

    # -- the worker thread

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._pending:
                try:
                    self._pending.append(self._queue.get(timeout=0.1))
                except queue.Empty:
                    continue
                # Give concurrent requests a few milliseconds to join this batch.
                deadline = time.monotonic() + self.batch_wait_ms / 1000
                while len(self._pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    try:
                        self._pending.append(self._queue.get(timeout=left))
                    except queue.Empty:
                        break
            self._drain()
            self._run_calls()
            self._run_batch()

    def _run_calls(self) -> None:
        calls = [j for j in self._pending if isinstance(j, _Call)]
        if not calls:
            return
        self._pending = deque(j for j in self._pending if not isinstance(j, _Call))
        classify = [c for c in calls if c.classify is not None]
        if len(classify) > 1:  # one forward pass for every waiting classification request
            adapters = [a for c in classify for a in c.classify[0]]
            texts = [t for c in classify for t in c.classify[1]]
            try:
                results = self.pool.classify(adapters, texts)
            except Exception:
                pass  # one of them is bad: run them one by one below, so each gets its own answer
            else:
                start = 0
                for c in classify:
                    n = len(c.classify[1])
                    _resolve(c, results[start : start + n])
                    start += n
                calls = [c for c in calls if c.classify is None]
        for c in calls:
            try:
                result = c.fn()
            except Exception as e:
                c.loop.call_soon_threadsafe(_set_exception, c.future, e)
            else:
                _resolve(c, result)

    def _take(self, running: dict[int, _Generation]) -> list[_Generation]:
        """Waiting requests that fit beside the running ones: max_batch rows, pool.max_adapters adapters."""
        adapters = {j.row.adapter for j in running.values()} - {BASE}
        taken, rest = [], deque()
        for job in self._pending:
            if isinstance(job, _Call):
                rest.append(job)
            elif job.row.cancelled:
                job.row.finish_reason = "cancelled"
                self.finished.append((job.row.adapter, "cancelled", 0))
            elif job.row.adapter != BASE and job.row.adapter not in self.pool.adapters:
                self._send(job, "error", f"adapter {job.row.adapter!r} was unloaded before this request ran")
            elif len(running) + len(taken) < self.max_batch and (
                job.row.adapter in adapters or job.row.adapter == BASE or len(adapters) < self.pool.max_adapters
            ):
                taken.append(job)
                adapters.add(job.row.adapter)
            else:
                rest.append(job)
        self._pending = rest
        for job in taken:
            running[id(job.row)] = job
        return taken

    def _run_batch(self) -> None:
        running: dict[int, _Generation] = {}
        first = self._take(running)
        if not first:
            return

        def admit(n: int) -> list[Row]:
            """Between two steps: let waiting requests join, unless a call (load, unload, classify) waits."""
            for key, job in list(running.items()):
                if job.row.finish_reason is not None:  # cancelled before its prefill: never stepped
                    self.finished.append((job.row.adapter, job.row.finish_reason, len(job.row.tokens)))
                    del running[key]
            self._drain()
            if self._stop.is_set() or any(isinstance(j, _Call) for j in self._pending):
                return []
            return [j.row for j in self._take(running)]

        def on_step(rows: list[Row]) -> None:
            self.steps.append(tuple(r.adapter for r in rows if r.finish_reason != "error"))
            for row in rows:
                job = running[id(row)]
                if job.stream:
                    text = row.stream_text()
                    if len(text) > row.sent:
                        self._send(job, "delta", text[row.sent :])
                        row.sent = len(text)
                if row.finish_reason is not None or row.cancelled:
                    reason = row.finish_reason or "cancelled"
                    self.finished.append((row.adapter, reason, len(row.tokens)))
                    if reason == "error":
                        self._send(job, "error", row.error)
                    else:
                        self._send(job, "done", None)
                    del running[id(row)]

        try:
            self.pool.generate([j.row for j in first], on_step, admit)
        except Exception as e:
            for job in running.values():
                job.row.finish_reason = "error"
                self._send(job, "error", f"generation failed: {type(e).__name__}: {e}")

    def _drain(self) -> None:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    @staticmethod
    def _send(job: _Generation, kind: str, value: Any) -> None:
        job.loop.call_soon_threadsafe(job.events.put_nowait, (kind, value))


def _resolve(call: _Call, value: Any) -> None:
    call.loop.call_soon_threadsafe(lambda: call.future.done() or call.future.set_result(value))


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


# ---------------------------------------------------------------- request parsing


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    from starlette.responses import JSONResponse

    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


async def _json_body(request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise RequestError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _number(body: dict, key: str, default: float, low: float, high: float, *, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise RequestError(400, f"`{key}` must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not low <= value <= high:
        raise RequestError(400, f"`{key}` must be between {low} and {high}, got {value}", key)
    return value


@dataclass
class Limits:
    """What one request may ask for; over-limit requests get a 400 naming the limit."""

    max_tokens: int = 512  # most new tokens per request (`--max-tokens-limit`)
    default_max_tokens: int = 128  # when a request gives none
    max_prompt_tokens: int | None = None  # None: the model's context minus the tokens asked for


# ---------------------------------------------------------------- the app


def create_app(
    pool: AdapterPool,
    *,
    token: str | None = None,
    limits: Limits | None = None,
    max_batch: int = 16,
    batch_wait_ms: float = 5.0,
) -> Starlette:
    """The Starlette app serving `pool` (start it with uvicorn, or ServerThread in tests).

    Args:
        pool: the base and adapters to serve; the app's worker thread runs every model call on it.
        token: bearer token the admin routes require; None leaves them open (loopback only: see serve()).
        limits: per-request limits (max_tokens, prompt length).
        max_batch: most rows decoded together.
        batch_wait_ms: how long the first request of a batch waits for company.

    `app.state.scheduler.steps` records the adapters of the rows of every forward pass, and
    `.finished` each row's (adapter, finish_reason, tokens): what the tests check batching with.
    """
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    limits = limits or Limits()
    scheduler = Scheduler(pool, max_batch=max_batch, batch_wait_ms=batch_wait_ms)

    def model_entry(name: str) -> dict[str, Any]:
        info = pool.adapters.get(name)
        return {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "qtune",
            "kind": info.kind if info else "causal-lm",
            "source": info.source if info else "base",
            "resident": name == BASE or name in pool.resident,
        }

    def check_model(body: dict, kind: str) -> str:
        name = body.get("model")
        valid = [n for n in pool.names() if n == BASE or pool.adapters[n].kind == kind]
        if kind == "sequence-classification":
            valid.remove(BASE)
        if not isinstance(name, str) or not name:
            raise RequestError(400, f"`model` is required: one of {', '.join(valid)}", "model")
        if name not in valid:
            other = name in pool.names()
            why = "is not a " + ("text-generation" if kind == "causal-lm" else "classification") + " model"
            raise RequestError(
                400 if other else 404,
                f"model {name!r} {why if other else 'does not exist'}; valid names here: {', '.join(valid) or 'none'}",
                "model",
                None if other else "model_not_found",
            )
        return name

    def sampling(body: dict, prompt_tokens: int) -> Sampling:
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, min(limits.default_max_tokens, limits.max_tokens), 1, 10**9, integer=True)
        if max_tokens > limits.max_tokens:
            raise RequestError(
                400,
                f"`{key}`={max_tokens} is over this server's limit of {limits.max_tokens} (--max-tokens-limit)",
                key,
            )
        if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt is {prompt_tokens} tokens, over this server's limit of {limits.max_prompt_tokens} "
                "(--max-prompt-tokens): shorten it",
                code="context_length_exceeded",
            )
        if pool.context is not None and prompt_tokens + max_tokens > pool.context:
            raise RequestError(
                400,
                f"the prompt is {prompt_tokens} tokens and `{key}` is {max_tokens}: together over the model's "
                f"context of {pool.context} tokens; shorten the prompt or lower `{key}`",
                code="context_length_exceeded",
            )
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise RequestError(400, "`stop` must be a non-empty string or a list of them", "stop")
        if stop is not None and len(stop) > 4:
            raise RequestError(400, f"`stop` takes at most 4 strings, got {len(stop)}", "stop")
        if body.get("n") not in (None, 1):
            raise RequestError(400, f"`n` must be 1 (one completion per request), got {body['n']!r}", "n")
        return Sampling(
            temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
            top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0)),
            seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
            max_tokens=max_tokens,
            stop=stop or [],
        )

    def chat_prompt(body: dict, model: str) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "`messages` must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                content = "".join(p for p in parts if isinstance(p, str)) if len(parts) == len(content) else None
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise RequestError(400, f"`messages[{i}]` must have a string `role` and text `content`", "messages")
            clean.append({"role": m["role"], "content": content})
        try:
            return pool.chat_ids(model, clean)
        except ConfigError as e:
            raise RequestError(400, str(e), "messages") from None
        except Exception as e:  # a template that rejects the roles given (e.g. no system role)
            raise RequestError(400, f"the chat template rejected these messages: {e}", "messages") from None

    def text_prompt(body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "`prompt` must be a non-empty string (one prompt per request)", "prompt")
        return pool.encode(prompt)

    async def wait_disconnect(request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.02)

    async def complete(request, chat: bool):
        body = await _json_body(request)
        model = check_model(body, "causal-lm")
        prompt = chat_prompt(body, model) if chat else text_prompt(body)
        row = Row(model, prompt, sampling(body, len(prompt)))
        stream = body.get("stream") is True
        include_usage = (
            stream and isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        )
        job = scheduler.submit_generation(row, stream)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage() -> dict[str, int]:
            n = len(row.tokens)
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if stream:
                delta = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }

        if not stream:
            watcher = asyncio.ensure_future(wait_disconnect(request))
            try:
                while True:
                    getter = asyncio.ensure_future(job.events.get())
                    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():  # the client left: free its slot
                        getter.cancel()
                        row.cancelled = True
                        return _error(499, "client disconnected")
                    kind, value = getter.result()
                    if kind == "error":
                        return _error(500, value)
                    if kind == "done":
                        break
            finally:
                watcher.cancel()
            body = {"id": rid, "object": obj, "created": created, "model": model}
            return JSONResponse({**body, "choices": [choice(row.text, row.finish_reason)], "usage": usage()})

        def sse(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            head = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": model}
            try:
                if chat:
                    yield sse({**head, "choices": [choice(None, None, first=True)]})
                while True:
                    kind, value = await job.events.get()
                    if kind == "delta":
                        yield sse({**head, "choices": [choice(value, None)]})
                    elif kind == "error":
                        yield sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                        break
                    else:
                        yield sse({**head, "choices": [choice(None, row.finish_reason)]})
                        if include_usage:
                            yield sse({**head, "choices": [], "usage": usage()})
                        break
                yield "data: [DONE]\n\n"
            finally:  # normal end, or the client went away (Starlette cancels this generator)
                if row.finish_reason is None:
                    row.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def classify(request):
        body = await _json_body(request)
        model = check_model(body, "sequence-classification")
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
        return JSONResponse({"object": "list", "data": [model_entry(n) for n in pool.names()]})

    def authorize(request) -> None:
        if token is None:
            return  # only possible on loopback: serve() refuses to bind further without a token
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise RequestError(401, "admin routes need `Authorization: Bearer <token>` (the --token of qtune serve)")

    async def load_adapter(request):
        authorize(request)
        body = await _json_body(request)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise RequestError(400, "give `name` (the model name clients will use) and `path` (an adapter folder)")
        if name in pool.adapters:
            raise RequestError(409, f"an adapter named {name!r} is already loaded; DELETE it first", "name")
        try:
            await scheduler.call(lambda: pool.add(name, path))
        except AdapterError as e:
            raise RequestError(400, str(e)) from None
        return JSONResponse(model_entry(name), status_code=201)

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
                return _error(e.status, e.message, e.param, e.code)

        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

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
    """
    import uvicorn

    from qtune.errors import ModelError, PlanError
    from qtune.plan import parse_bytes

    if not is_loopback(host) and not token:
        raise ConfigError(
            f"--host {host} is reachable from other machines: set --token (or QTUNE_SERVE_TOKEN) so that "
            "the admin routes that load and unload adapters are protected"
        )
    for flag, value in (("--max-batch", max_batch), ("--max-tokens-limit", max_tokens_limit)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    try:
        budget = parse_bytes(max_adapter_memory) if max_adapter_memory else None
    except PlanError:
        raise ConfigError(f"--max-adapter-memory: cannot read {max_adapter_memory!r}; use e.g. 512MB or 2GB") from None
    if adapters_dir is not None and not Path(adapters_dir).is_dir():
        raise AdapterError(f"--adapters: {adapters_dir} is not a folder (give the folder that holds adapter folders)")
    try:
        pool = AdapterPool(base, quant=quant, dtype=dtype, max_adapters=max_adapters, max_adapter_bytes=budget)
    except ModelError as e:  # resolve_base speaks of the config key; here the flag is --base
        raise ModelError(str(e).replace("model.name:", "--base:", 1)) from None
    names = pool.add_folder(adapters_dir) if adapters_dir is not None else []
    print(f"serving {pool.base_path} ({quant}) with adapters: {', '.join(names) or 'none'}", flush=True)
    limits = Limits(max_tokens=max_tokens_limit, max_prompt_tokens=max_prompt_tokens)
    app = create_app(pool, token=token, limits=limits, max_batch=max_batch)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
