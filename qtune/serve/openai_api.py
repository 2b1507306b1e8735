"""The OpenAI-compatible wire format of `qtune serve`: reading and checking requests, shaping responses.

Every check raises RequestError with the HTTP status, the message the client sees and the field at
fault; serve.py turns it into an OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qtune.errors import ConfigError
from qtune.meta import CAUSAL_LM, CLASSIFIER
from qtune.serve.decode import BASE, Sampling
from qtune.serve.pool import AdapterPool


class RequestError(Exception):
    """A request the server refuses: its HTTP status and the message the client sees."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Limits:
    """What one request may ask for; over-limit requests get a 4xx naming the limit."""

    max_tokens: int = 512  # most new tokens per request (`--max-tokens-limit`)
    default_max_tokens: int = 128  # when a request gives none
    max_prompt_tokens: int | None = None  # None: the model's context minus the tokens asked for
    max_body_bytes: int = 4 * 2**20  # a larger request body is a 413, read no further (`--max-body`)
    timeout_s: float | None = 300.0  # time budget from arrival to the last token (`--request-timeout`)


# ---------------------------------------------------------------- requests


async def read_body(request, limit: int) -> bytes:
    """The request's bytes, or a 413 as soon as they are over `limit` (from Content-Length, or while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, _too_large(f"{declared} bytes", limit), code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, _too_large(f"over {limit} bytes", limit), code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, limit: int) -> str:
    return f"the request body is {size}, over this server's limit of {limit} bytes (--max-body)"


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request's JSON object, or a 400 that says what is wrong with it (or which field is not text)."""
    from qtune.data.read import lone_surrogate

    try:
        body = json.loads(raw)
    except ValueError as e:
        raise RequestError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    where = lone_surrogate(body)
    if where is not None:  # valid JSON ("\ud800"), not valid Unicode: no tokenizer takes it
        raise RequestError(400, f"`{where}` holds a lone surrogate (\\ud800-\\udfff), not text", where)
    return body


def read_completion(
    pool: AdapterPool, limits: Limits, raw: bytes, chat: bool
) -> tuple[dict[str, Any], str, list[int], Sampling]:
    """A chat or text completion request: (body, model, prompt token ids, sampling), all checked.

    The server runs this off its event loop: parsing and tokenizing a large body takes a while."""
    body = parse_json(raw)
    model = check_model(pool, body, CAUSAL_LM)
    prompt = read_chat_prompt(pool, limits, body, model) if chat else read_text_prompt(pool, limits, body)
    return body, model, prompt, read_sampling(pool, limits, body, len(prompt))


def check_model(pool: AdapterPool, body: dict, kind: str) -> str:
    """The request's `model`: a served name of this kind ("causal-lm" or "sequence-classification")."""
    name = body.get("model")
    valid = [n for n in pool.names() if n == BASE or pool.adapters[n].kind == kind]
    if kind == CLASSIFIER:
        valid.remove(BASE)
    if not isinstance(name, str) or not name:
        raise RequestError(400, f"`model` is required: one of {', '.join(valid)}", "model")
    if name not in valid:
        other = name in pool.names()
        why = "is not a " + ("text-generation" if kind == CAUSAL_LM else "classification") + " model"
        raise RequestError(
            400 if other else 404,
            f"model {name!r} {why if other else 'does not exist'}; valid names here: {', '.join(valid) or 'none'}",
            "model",
            None if other else "model_not_found",
        )
    return name


def read_sampling(pool: AdapterPool, limits: Limits, body: dict, prompt_tokens: int) -> Sampling:
    """The request's sampling fields, checked against the server's limits and the model's context."""
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


def read_chat_prompt(pool: AdapterPool, limits: Limits, body: dict, model: str) -> list[int]:
    """Token ids of the request's `messages` through the chat template (text content only)."""
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
        text = pool.chat_text(model, clean)
    except ConfigError as e:
        raise RequestError(400, str(e), "messages") from None
    except Exception as e:  # a template that rejects the roles given (e.g. no system role)
        raise RequestError(400, f"the chat template rejected these messages: {e}", "messages") from None
    return _tokenize(pool, limits, text, special=False)


def read_text_prompt(pool: AdapterPool, limits: Limits, body: dict) -> list[int]:
    """Token ids of the request's `prompt` (one string)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "`prompt` must be a non-empty string (one prompt per request)", "prompt")
    return _tokenize(pool, limits, prompt, special=True)


def _tokenize(pool: AdapterPool, limits: Limits, text: str, special: bool) -> list[int]:
    """The prompt's token ids; a prompt surely over the limit is refused before it is tokenized.

    No token covers more than `pool.max_token_bytes` bytes of text, so a text of N bytes has at least
    N / max_token_bytes tokens: a 20 MB prompt is refused in microseconds, not after seconds of tokenizing.
    """
    limit = limits.max_prompt_tokens or pool.context
    size = len(text.encode("utf-8"))
    if limit is not None and size > limit * pool.max_token_bytes:
        flag = " (--max-prompt-tokens)" if limits.max_prompt_tokens else "'s context"
        raise RequestError(
            400,
            f"the prompt is {size} bytes, at least {-(-size // pool.max_token_bytes)} tokens, over the "
            f"limit of {limit} tokens of this server{flag}: shorten it",
            code="context_length_exceeded",
        )
    return pool.tokenizer(text, add_special_tokens=special)["input_ids"]


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


# ---------------------------------------------------------------- responses


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    """An OpenAI-style error body with its status."""
    from starlette.responses import JSONResponse

    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def model_entry(pool: AdapterPool, name: str) -> dict[str, Any]:
    """One entry of GET /v1/models, with qtune's extras: kind, source, and whether it is resident."""
    info = pool.adapters.get(name)
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "qtune",
        "kind": info.kind if info else CAUSAL_LM,
        "source": info.source if info else "base",
        "resident": name == BASE or name in pool.resident,
    }


def choice(text: str | None, finish: str | None, *, chat: bool, stream: bool, first: bool = False) -> dict[str, Any]:
    """The one choice of a completion: a chat message or delta (the first delta names the role), or text."""
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


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The token counts of a completion, as OpenAI reports them."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"
