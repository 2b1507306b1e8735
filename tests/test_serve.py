"""`qtune serve` end to end: a real uvicorn server on loopback, the official `openai` client as the client.

The no-cross-talk test runs K concurrent clients over M adapters with greedy decoding and checks every
response against the same adapter run alone in the pool, and that the batches really mixed adapters.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest

try:  # the HTTP client the installed openai package is built on (openai 3 ships httpx2, older ones httpx)
    import httpx2 as httpx
except ImportError:
    import httpx

from qtune.errors import ConfigError
from qtune.serve import Limits, ServerThread, create_app, is_loopback, serve
from qtune.serve.decode import BASE, Row, Sampling
from qtune.serve.pool import AdapterPool
from tests.test_pool import PROMPTS, adapter_set  # noqa: F401  (a fixture)

MAX_TOKENS = 200  # the server's --max-tokens-limit in these tests
GENERATORS = [BASE, "alpha", "beta", "gamma", "qdemo"]


@pytest.fixture(scope="module")
def server(adapter_set):  # noqa: F811
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    pool.add_folder(adapter_set["adapters"])
    app = create_app(pool, limits=Limits(max_tokens=MAX_TOKENS, max_prompt_tokens=40), batch_wait_ms=30)
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        yield {"url": url, "pool": pool, "scheduler": app.state.scheduler, "client": client, "dirs": adapter_set}


def chat(messages_text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": messages_text}]


def alone_chat(pool: AdapterPool, adapter: str, text: str, max_tokens: int) -> Row:
    """What the adapter produces for this chat on its own: a batch of one, straight through the pool."""
    return pool.generate([Row(adapter, pool.chat_ids(adapter, chat(text)), Sampling(max_tokens=max_tokens))])[0]


def test_models_lists_base_and_adapters(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == [BASE, "alpha", "beta", "gamma", "qdemo", "sentiment"]
    assert {m.id: m.model_extra["kind"] for m in models.data}["sentiment"] == "sequence-classification"


def test_concurrent_clients_get_exactly_their_adapters_output(server):
    pool, client, scheduler = server["pool"], server["client"], server["scheduler"]
    jobs = [(GENERATORS[i % len(GENERATORS)], PROMPTS[i % len(PROMPTS)], i % 3 == 0) for i in range(20)]
    expected = {}
    for adapter, prompt, completion in jobs:
        if completion:
            ids = pool.encode(prompt)
            expected[adapter, prompt, True] = pool.generate([Row(adapter, ids, Sampling(max_tokens=8))])[0]
        else:
            expected[adapter, prompt, False] = alone_chat(pool, adapter, prompt, 8)
    seen = len(scheduler.steps)
    barrier = threading.Barrier(len(jobs))

    def call(job):
        adapter, prompt, completion = job
        barrier.wait()
        if completion:
            r = client.completions.create(model=adapter, prompt=prompt, max_tokens=8, temperature=0)
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        r = client.chat.completions.create(model=adapter, messages=chat(prompt), max_tokens=8, temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(call, jobs))
    for job, (text, finish, n) in zip(jobs, results):
        ref = expected[job]
        assert (text, finish, n) == (ref.text, ref.finish_reason, len(ref.tokens)), job
    assert len({text for text, _, _ in results}) > len(GENERATORS)  # the outputs do differ between adapters
    steps = list(scheduler.steps)[seen:]
    assert max(len(set(s)) for s in steps) >= 3, steps  # rows of several adapters ran in one forward pass


def test_streaming_equals_the_whole_answer(server):
    client, pool = server["client"], server["pool"]
    ref = alone_chat(pool, "beta", PROMPTS[1], 12)
    chunks = list(
        client.chat.completions.create(
            model="beta",
            messages=chat(PROMPTS[1]),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == ref.text and finish == [ref.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.tokens)
    stream = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
    ids = pool.encode(PROMPTS[0])
    ref = pool.generate([Row("alpha", ids, Sampling(max_tokens=12))])[0]
    assert "".join(c.choices[0].text for c in stream) == ref.text


def test_sampling_parameters(server):
    client = server["client"]

    def ask(**kw):
        r = client.chat.completions.create(model="gamma", messages=chat(PROMPTS[2]), max_tokens=16, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason

    assert ask(temperature=1.2, top_p=0.9, seed=7) == ask(temperature=1.2, top_p=0.9, seed=7)
    assert len({ask(temperature=1.5, seed=s)[0] for s in range(4)}) > 1
    greedy, _ = ask(temperature=0)
    assert ask(temperature=1.5, top_p=0.0, seed=3)[0] == greedy  # the nucleus keeps the likeliest token
    stop = greedy[4:6]
    assert ask(temperature=0, stop=[stop]) == (greedy[: greedy.find(stop)], "stop")


def test_bad_requests_get_clear_4xx_and_the_server_stays_up(server):
    client, url = server["client"], server["url"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=chat("hi"), max_tokens=4)
    assert "model 'nope' does not exist" in str(e.value) and "alpha, beta, gamma, qdemo" in str(e.value)
    assert e.value.body["code"] == "model_not_found"
    bad = {
        "max_tokens": {"max_tokens": MAX_TOKENS + 1},
        "temperature": {"temperature": 7},
        "prompt is": {"messages": chat(" ".join(["hello how are you"] * 20))},
        "`n` must be 1": {"n": 2},
        "`messages` must be": {"messages": []},
        "`stop` must be": {"stop": [""]},
        "not a text-generation model": {"model": "sentiment"},
    }
    for needle, change in bad.items():
        body = {"model": "alpha", "messages": chat("hi"), "max_tokens": 4, **change}
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (needle, r.text)
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 200"):
        client.completions.create(model="alpha", prompt="hi", max_tokens=MAX_TOKENS + 1)
    for raw in (b"{not json", b"[1, 2]", b""):
        r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"], r.text
    r = client.chat.completions.create(model="alpha", messages=chat("hi"), max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


def _a_long_chat(pool) -> tuple[str, str]:
    """(adapter, prompt) of a chat that runs to the full token budget: what the disconnect test cuts short."""
    for adapter in GENERATORS:
        for prompt in PROMPTS:
            if alone_chat(pool, adapter, prompt, MAX_TOKENS).finish_reason == "length":
                return adapter, prompt
    raise AssertionError("every chat ends early on this tiny model; the test needs one that does not")


def _wait_cancelled(scheduler, before: int) -> tuple:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        new = list(scheduler.finished)[before:]
        if new:
            return new[0]
        time.sleep(0.02)
    raise AssertionError("the row never finished")


def test_a_client_that_disconnects_frees_its_slot(server):
    pool, scheduler, url = server["pool"], server["scheduler"], server["url"]
    adapter, prompt = _a_long_chat(pool)
    body = {"model": adapter, "messages": chat(prompt), "max_tokens": MAX_TOKENS, "temperature": 0}

    before = len(scheduler.finished)  # streaming: read one chunk, hang up
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        next(r.iter_lines())
    assert _wait_cancelled(scheduler, before)[:2] == (adapter, "cancelled")

    before = len(scheduler.finished)  # not streaming: send the request, hang up once its row is decoding
    steps = len(scheduler.steps)
    host, port = urlparse(url).hostname, urlparse(url).port
    payload = json.dumps(body).encode()
    with socket.create_connection((host, port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        while len(scheduler.steps) == steps:
            time.sleep(0.001)
    assert _wait_cancelled(scheduler, before)[:2] == (adapter, "cancelled")
    assert server["client"].models.list().data  # still up


def test_classify(server):
    pool, url = server["pool"], server["url"]
    texts = PROMPTS[:3]
    r = httpx.post(url + "/v1/classify", json={"model": "sentiment", "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    ref = [pool.classify(["sentiment"], [t])[0] for t in texts]
    assert [d["label"] for d in data] == [x["label"] for x in ref]
    for d, x in zip(data, ref):
        assert d["probabilities"] == pytest.approx(x["probabilities"], abs=1e-5)
    r = httpx.post(url + "/v1/classify", json={"model": "alpha", "input": "hi"})
    assert r.status_code == 400 and "not a classification model" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/classify", json={"model": "nope", "input": "hi"})
    assert r.status_code == 404 and "valid names here: sentiment" in r.json()["error"]["message"]


def test_an_unexpected_error_is_a_json_500_and_the_server_stays_up(server, monkeypatch):
    pool, url = server["pool"], server["url"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pool, "classify", broken)
    r = httpx.post(url + "/v1/classify", json={"model": "sentiment", "input": "hi"})
    assert r.status_code == 500 and "internal error: RuntimeError: disk on fire" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert httpx.post(url + "/v1/classify", json={"model": "sentiment", "input": "hi"}).status_code == 200


def test_admin_loads_and_unloads_adapters(server):
    url, client, dirs = server["url"], server["client"], server["dirs"]
    r = httpx.post(url + "/admin/adapters", json={"name": "delta", "path": str(dirs["adapters"] / "beta")})
    assert r.status_code == 201, r.text
    beta = client.chat.completions.create(model="beta", messages=chat("hi"), max_tokens=6, temperature=0)
    delta = client.chat.completions.create(model="delta", messages=chat("hi"), max_tokens=6, temperature=0)
    assert delta.choices[0].message.content == beta.choices[0].message.content  # the same weights
    r = httpx.post(url + "/admin/adapters", json={"name": "bad", "path": str(dirs["root"] / "foreign-qtune")})
    assert r.status_code == 400 and "fingerprint" in r.json()["error"]["message"]
    assert httpx.delete(url + "/admin/adapters/delta").status_code == 200
    assert httpx.delete(url + "/admin/adapters/delta").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="delta", messages=chat("hi"), max_tokens=6)


def test_admin_load_of_an_adapter_whose_base_moved_is_a_clear_400(server, tmp_path):
    moved = tmp_path / "moved-base"
    shutil.copytree(server["dirs"]["adapters"] / "sentiment", moved)
    meta = json.loads((moved / "qtune.json").read_text())
    meta["config"]["model"]["name"] = str(tmp_path / "no-such-base")  # the folder it was trained on is gone
    (moved / "qtune.json").write_text(json.dumps(meta))
    r = httpx.post(server["url"] + "/admin/adapters", json={"name": "moved", "path": str(moved)})
    assert r.status_code == 400 and "no-such-base" in r.json()["error"]["message"], r.text
    assert "moved" not in server["pool"].names()


def test_admin_routes_need_the_token_when_one_is_set(adapter_set):  # noqa: F811
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    with ServerThread(create_app(pool, token="s3cret")) as url:
        body = {"name": "alpha", "path": str(adapter_set["adapters"] / "alpha")}
        r = httpx.post(url + "/admin/adapters", json=body)
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        r = httpx.post(url + "/admin/adapters", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = httpx.post(url + "/admin/adapters", json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 201
        assert httpx.get(url + "/v1/models").status_code == 200  # the OpenAI routes stay open


def test_serve_refuses_to_listen_beyond_loopback_without_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(ConfigError, match="--token"):
        serve("smollm2-135m", host="0.0.0.0")


def test_requests_over_the_adapter_memory_budget_take_turns(adapter_set):  # noqa: F811
    """Two adapters that cannot be resident together: their requests run one after the other, not fail."""
    size = (adapter_set["adapters"] / "alpha" / "adapter_model.safetensors").stat().st_size
    pool = AdapterPool(str(adapter_set["base"]), quant="none", max_adapter_bytes=int(size * 1.5))
    pool.add_folder(adapter_set["adapters"])
    expected = [alone_chat(pool, a, PROMPTS[0], 6).text for a in ("alpha", "beta", "alpha", "beta")]
    app = create_app(pool, batch_wait_ms=300)  # long enough for all four to wait in one queue
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

        def ask(adapter):
            r = client.chat.completions.create(model=adapter, messages=chat(PROMPTS[0]), max_tokens=6, temperature=0)
            return r.choices[0].message.content

        with ThreadPoolExecutor(4) as ex:
            assert list(ex.map(ask, ["alpha", "beta", "alpha", "beta"])) == expected
    assert all(len(set(s) - {BASE}) <= 1 for s in app.state.scheduler.steps)  # one adapter per batch


# ---------------------------------------------------------------- hostile input


@pytest.fixture(scope="module")
def guarded_server(adapter_set):  # noqa: F811
    """A server with a small body cap, for the abuse tests (the pool is the tiny base alone)."""
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    app = create_app(pool, limits=Limits(max_body_bytes=64_000, max_prompt_tokens=100), prefill_chunk=16)
    with ServerThread(app) as url:
        yield {"url": url, "pool": pool, "app": app}


def test_a_body_over_the_cap_is_a_413_without_being_read_whole(guarded_server):
    url = guarded_server["url"]
    big = json.dumps({"model": "base", "prompt": "x" * 100_000}).encode()
    r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over this server's limit of 64000 bytes (--max-body)" in r.text, r.text
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the cap applies while reading
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 64000 bytes" in r.text, r.text
    assert httpx.get(url + "/health").status_code == 200


def test_a_prompt_surely_over_the_limit_is_refused_before_it_is_tokenized(guarded_server, monkeypatch):
    url, pool = guarded_server["url"], guarded_server["pool"]
    calls = []
    real = pool.tokenizer.__call__
    monkeypatch.setattr(type(pool.tokenizer), "__call__", lambda self, *a, **k: calls.append(a) or real(*a, **k))
    text = "word " * 10_000  # 50 KB: under the body cap, far over 100 tokens
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": text, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert "the prompt is 50000 bytes, at least" in r.json()["error"]["message"]
    assert calls == []  # never tokenized
    r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "word " * 101, "max_tokens": 2})
    assert r.status_code == 400 and "the prompt is 10" in r.json()["error"]["message"]  # tokenized, then counted
    assert calls


def test_a_lone_surrogate_is_a_400_naming_the_field(guarded_server):
    url = guarded_server["url"]
    headers = {"content-type": "application/json"}
    for route, body, field in (
        ("/v1/completions", b'{"model": "base", "prompt": "hi \\ud800"}', "prompt"),
        (
            "/v1/chat/completions",
            b'{"model": "base", "messages": [{"role": "user", "content": "\\udfff"}]}',
            "messages[0].content",
        ),
    ):
        r = httpx.post(url + route, content=body, headers=headers)
        assert r.status_code == 400 and f"`{field}` holds a lone surrogate" in r.text, r.text
        assert r.json()["error"]["param"] == field


def test_parsing_and_tokenizing_run_off_the_event_loop(guarded_server, monkeypatch):
    """A request that is slow to prepare (a stand-in for a huge body) does not stall /health or other requests."""
    url, pool = guarded_server["url"], guarded_server["pool"]
    real = pool.chat_text

    def slow(*args):
        time.sleep(3)
        return real(*args)

    monkeypatch.setattr(pool, "chat_text", slow)
    body = {"model": "base", "messages": chat("hi"), "max_tokens": 2}
    with ThreadPoolExecutor(1) as ex:
        pending = ex.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
        time.sleep(0.3)  # the slow one is being prepared now
        start = time.monotonic()
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "hello", "max_tokens": 2})
        quick = time.monotonic() - start
        assert r.status_code == 200 and not pending.done()
        assert pending.result().status_code == 200
    assert quick < 2.5  # answered while the slow request was still being prepared (it takes 3 s)


def test_a_request_past_the_time_budget_is_a_504(adapter_set):  # noqa: F811
    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    app = create_app(pool, limits=Limits(timeout_s=0.001), batch_wait_ms=20)
    with ServerThread(app) as url:
        body = {"model": "base", "prompt": "hello how are you", "max_tokens": 50}
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        assert "time budget" in r.json()["error"]["message"] and "--request-timeout" in r.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "timeout"


def test_bad_adapter_folders_are_skipped_at_startup_and_listed(adapter_set, tmp_path):  # noqa: F811
    folder = tmp_path / "adapters"
    shutil.copytree(adapter_set["adapters"] / "alpha", folder / "alpha")
    truncated = shutil.copytree(adapter_set["adapters"] / "beta", folder / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    listed = shutil.copytree(adapter_set["adapters"] / "qdemo", folder / "listed")
    (listed / "qtune.json").write_text("[1, 2]")
    garbled = shutil.copytree(adapter_set["adapters"] / "gamma", folder / "garbled")
    (garbled / "adapter_config.json").write_text("{not json")

    pool = AdapterPool(str(adapter_set["base"]), quant="none")
    assert pool.add_folder(folder) == ["alpha"]
    assert set(pool.skipped) == {"truncated", "listed", "garbled"}
    assert "is corrupt or incomplete" in pool.skipped["truncated"]
    assert "qtune.json" in pool.skipped["listed"] and "adapter_config.json" in pool.skipped["garbled"]
    with ServerThread(create_app(pool)) as url:
        models = httpx.get(url + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == [BASE, "alpha"]
        assert {s["id"]: s["reason"] for s in models["skipped"]} == pool.skipped
        r = httpx.post(url + "/admin/adapters", json={"name": "t", "path": str(truncated)})
        assert r.status_code == 400 and "is corrupt or incomplete" in r.json()["error"]["message"], r.text
        r = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
