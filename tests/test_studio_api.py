"""qtune studio's JSON API over HTTP: runs started, watched, stopped and resumed through it (real `qtune train`
processes on a tiny model), runs started from a terminal, the security guard, and the planner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from qtune.serve.app import ServerThread
from qtune.studio.app import create_studio_app
from qtune.studio.common import Studio
from tests.conftest import make_model_folder, write_jsonl

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"review {i}: the movie was {w}"},
            {"role": "assistant", "content": "positive" if w == "great" else "negative"},
        ]
    }
    for i, w in enumerate(["great", "boring", "great", "terrible", "great", "dull", "wonderful", "boring"])
]
CONFIG = """# a tiny run for the studio's tests
model: {name: model, dtype: fp32}
quant: {method: none}
lora: {r: 4}
data: {train: train.jsonl}
train: {batch_size: 4, max_steps: 6, save_every: 2, logging_steps: 1, eval_every: 0, report_to: none}
output: {dir: adapters, name: tiny}
"""
TINY = "project:configs/tiny.yaml"
DEADLINE_S = 240


@pytest.fixture(scope="module")
def project(tmp_path_factory, chatml_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("project")
    make_model_folder(root / "model", chatml_tokenizer)
    write_jsonl(root / "train.jsonl", ROWS)
    (root / "bad.jsonl").write_text("this is not JSON\n")
    (root / "configs").mkdir()
    (root / "configs" / "tiny.yaml").write_text(CONFIG)
    (root / "adapters").mkdir()
    return root.resolve()


@pytest.fixture(scope="module")
def studio(project) -> Studio:
    return Studio(project=project, dir=project / "adapters")


@pytest.fixture(scope="module")
def url(studio):
    with ServerThread(create_studio_app(studio)) as url:
        yield url
    for launched in studio.processes.values():  # a test that failed midway leaves no training behind
        if launched.process.poll() is None:
            os.killpg(launched.process.pid, 9)


def call(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None):
    """(status, JSON body, headers) of one request; JSON content type on every POST unless `headers` says other."""
    data = json.dumps(body if body is not None else {}).encode() if method != "GET" else None
    sent = {"Content-Type": "application/json"} if method != "GET" else {}
    request = urllib.request.Request(url, data=data, method=method, headers={**sent, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            raw, status, got = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, status, got = e.read(), e.code, e.headers
    try:
        return status, json.loads(raw), got
    except ValueError:
        return status, raw.decode("utf-8", "replace"), got


def start(url: str, values: dict, config: str = TINY):
    return call(f"{url}/api/runs", "POST", {"config": config, "values": values})


def watch(url: str, name: str, until: set[str], seen: list[dict] | None = None) -> dict:
    """Poll the run until its state is one of `until`; every snapshot goes to `seen`."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        status, run, _ = call(f"{url}/api/runs/{name}")
        assert status == 200, run
        if seen is not None:
            seen.append(run)
        if run["state"] in until:
            return run
        time.sleep(0.25)
    raise AssertionError(f"run {name} never reached {until}: last {run['state']}\n{run.get('log_tail')}")


def error_of(response) -> tuple[int, str | None, str]:
    status, body, _ = response
    return status, body["error"]["field"], body["error"]["message"]


def test_a_run_started_from_the_page_trains_and_one_with_bad_data_fails(url, studio):
    status, run, _ = start(url, {"output.name": "first", "train.max_steps": "6"})
    assert status == 201, run
    assert run["state"] == "starting" and run["studio"] and not run["adapter"]
    status, bad, _ = start(url, {"output.name": "broken", "data.train": "bad.jsonl"})
    assert status == 201, bad

    failed = watch(url, "broken", {"failed", "finished"})
    assert failed["state"] == "failed" and failed["exit_code"] not in (None, 0)
    assert "bad.jsonl" in failed["error"] and "error:" in failed["log_tail"]

    seen: list[dict] = []
    done = watch(url, "first", {"finished", "failed"}, seen)
    assert done["state"] == "finished", done["log_tail"]
    assert done["adapter"] and done["exit_code"] == 0 and done["error"] is None
    assert done["step"] == 6 and done["max_steps"] == 6 and len(done["loss"]) == 6
    assert (studio.dir / "first" / "adapter_model.safetensors").is_file()
    assert any(r["state"] == "running" and r["loss"] for r in seen), [r["state"] for r in seen]
    assert done["config"]["output"] == {**done["config"]["output"], "dir": "adapters", "name": "first"}
    assert (studio.state_dir / "first.yaml").is_file() and (studio.state_dir / "first.log").is_file()
    record = json.loads((studio.state_dir / "first.json").read_text())
    assert record["exit_code"] == 0 and record["command"][0] == "train"

    status, listed, _ = call(f"{url}/api/runs")
    assert {r["name"]: r["state"] for r in listed["runs"]} == {"first": "finished", "broken": "failed"}

    # The name is taken now; a stop of a run that is not running is refused; a failed run's name is free again.
    assert error_of(start(url, {"output.name": "first"}))[:2] == (409, "output.name")
    assert call(f"{url}/api/runs/first/stop", "POST")[0] == 409
    assert call(f"{url}/api/runs/first/resume", "POST")[0] == 409
    assert call(f"{url}/api/runs/nobody", "GET")[0] == 404


def test_a_stopped_run_is_interrupted_and_resumes_to_the_end(url, studio):
    status, run, _ = start(url, {"output.name": "long", "train.max_steps": "24"})
    assert status == 201, run
    running = watch(url, "long", {"running", "finished", "failed"})
    while running["state"] == "running" and running["step"] < 3:  # a checkpoint (every 2 steps) is complete
        time.sleep(0.2)
        running = call(f"{url}/api/runs/long")[1]
    assert running["state"] == "running", running["log_tail"]
    assert running["max_steps"] == 24 and running["eta_s"] is not None

    status, stopping, _ = call(f"{url}/api/runs/long/stop", "POST")
    assert status == 202 and stopping["state"] == "stopping"
    stopped = watch(url, "long", {"interrupted", "failed", "finished"})
    assert stopped["state"] == "interrupted" and stopped["resumable"], stopped["log_tail"]
    assert stopped["exit_code"] == 130 and 3 <= stopped["step"] < 24
    assert error_of(start(url, {"output.name": "long"}))[:2] == (409, "output.name")

    status, resumed, _ = call(f"{url}/api/runs/long/resume", "POST")
    assert status == 202 and resumed["state"] == "starting"
    done = watch(url, "long", {"finished", "failed", "interrupted"})
    assert done["state"] == "finished" and done["adapter"] and done["step"] == 24, done["log_tail"]
    assert "resuming from" in done["log_tail"]
    assert json.loads((studio.dir / "long" / "qtune.json").read_text())["training"]["resumed_from_step"] >= 2


def test_a_run_started_from_a_terminal_shows_up(url, project):
    command = [sys.executable, "-m", "qtune.cli", "train", "configs/tiny.yaml", "output.name=term"]
    command += ["train.max_steps=12"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    seen: list[dict] = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        while process.poll() is None and time.monotonic() < deadline:
            status, run, _ = call(f"{url}/api/runs/term")
            if status == 200 and run["state"] == "running" and not seen:
                assert not run["studio"] and run["step"] is not None and run["max_steps"] == 12
                refused, body, _ = call(f"{url}/api/runs/term/stop", "POST")
                assert refused == 409 and "not started by this studio" in body["error"]["message"]
            if status == 200:
                seen.append(run)
            time.sleep(0.2)
        assert process.wait(timeout=DEADLINE_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
    done = call(f"{url}/api/runs/term")[1]
    assert done["state"] == "finished" and done["adapter"] and not done["studio"]
    assert len(done["loss"]) == 12 and done["config"]["output"]["name"] == "term"
    states = [(r["state"], r["step"]) for r in seen]
    assert {s for s, _ in states} <= {"running", "finished"} and states[0][0] == "running", states


def test_the_form_is_checked_field_by_field(url, project):
    cases = [
        ({"output.name": "../up"}, "output.name"),
        ({"output.name": "a/b"}, "output.name"),
        ({"output.name": "x", "train.lr": "abc"}, "train.lr"),
        ({"output.name": "x", "lora.r": "-1"}, "lora.r"),
        ({"output.name": "x", "quant.method": "q3"}, "quant.method"),
        ({"output.name": "x", "data.train": "/etc/passwd"}, "data.train"),
        ({"output.name": "x", "data.train": "../outside.jsonl"}, "data.train"),
        ({"output.name": "x", "model.name": str(project.parent)}, "model.name"),
        ({"output.name": "x", "model.name": "../model"}, "model.name"),
        ({"output.name": "x", "model.name": "llama-3.1-8b"}, "model.name"),  # a plan architecture, not a base
        ({"output.name": "x", "recipe": "evil.py"}, "recipe"),  # not a form key
        ({"output.name": "x", "train.max_steps": ["1"]}, "train.max_steps"),
    ]
    for values, field in cases:
        status, got, message = error_of(start(url, values))
        assert (status, got) == (400, field), (values, message)
    assert error_of(start(url, {"output.name": "x"}, config="project:../x.yaml"))[:2] == (400, "config")
    assert error_of(start(url, {"output.name": "x"}, config="shipped:nope.yaml"))[0] == 404
    assert error_of(start(url, {"output.name": "x"}, config="project:train.jsonl"))[0] == 404
    assert not (project / "adapters" / "x").exists() and not (project / "adapters" / ".studio" / "x.yaml").exists()


def test_configs_are_listed_with_the_form_keys(url):
    status, listed, _ = call(f"{url}/api/configs")
    ids = {c["id"]: c for c in listed["configs"]}
    assert ids[TINY] == {
        "id": TINY,
        "name": "tiny.yaml",
        "source": "project",
        "title": "a tiny run for the studio's tests",
    }
    assert "shipped:smollm2_sentiment.yaml" in ids
    status, one, _ = call(f"{url}/api/configs/{TINY}")
    assert status == 200 and one["values"]["model.name"] == "model" and one["values"]["train.max_steps"] == 6
    keys = {k["key"]: k for k in one["keys"]}
    assert keys["quant.method"]["type"] == "choice" and keys["quant.method"]["choices"] == [
        "nf4",
        "fp4",
        "int8",
        "none",
    ]
    assert keys["train.lr"]["type"] == "float" and keys["train.lr"]["help"] and keys["lora.r"]["default"] == 16
    assert call(f"{url}/api/configs/{urllib.parse.quote(TINY, safe='')}")[1]["id"] == TINY  # as the page encodes it
    assert call(f"{url}/api/configs/shipped:nope.yaml")[0] == 404


def test_the_guard_refuses_other_sites(url, project):
    good = call(f"{url}/api/info")
    assert good[0] == 200 and good[1]["project"] == str(project) and good[1]["dir"] == "adapters"
    assert good[2]["X-Content-Type-Options"] == "nosniff" and good[2]["X-Frame-Options"] == "DENY"
    assert "default-src 'self'" in good[2]["Content-Security-Policy"]
    port = url.rsplit(":", 1)[1]
    assert call(f"{url}/api/info", headers={"Host": f"evil.example:{port}"})[0] == 403
    assert call(f"{url}/api/info", headers={"Host": f"localhost:{port}"})[0] == 200
    assert call(f"{url}/api/info", headers={"Origin": "http://evil.example"})[0] == 403
    assert call(f"{url}/api/info", headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200
    assert call(f"{url}/api/runs/x/stop", "POST", headers={"Content-Type": "text/plain"})[0] == 415
    assert (
        call(f"{url}/api/runs/x/stop", "POST", headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    )
    assert call(f"{url}/static/..%2Fcommon.py")[0] == 404
    assert call(f"{url}/static/nothing.js")[0] == 404
    assert call(f"{url}/api/nothing")[1]["error"]["message"]


def test_a_token_is_required_once_set(project):
    studio = Studio(project=project, dir=project / "adapters", token="s3cret")
    with ServerThread(create_studio_app(studio)) as url:
        assert call(f"{url}/api/info")[0] == 401
        assert call(f"{url}/api/info", headers={"Authorization": "Bearer wrong"})[0] == 401
        status, info, _ = call(f"{url}/api/info", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and info["token_required"] is True
        assert call(f"{url}/v1/models")[0] == 401


def test_the_planner(url):
    assert "llama-3.1-8b" in call(f"{url}/api/plan/models")[1]["models"]
    base = {"model": "llama-3.1-8b", "vram": "8GB", "seq": 2048, "lora_r": 16, "quant": "nf4", "batch": 1}
    status, tight, _ = call(f"{url}/api/plan", "POST", base)
    assert status == 200 and tight["fits"] is False and tight["vram_bytes"] == 8 << 30
    assert 0 < tight["longest_seq"] < 2048 and tight["total_bytes"] == sum(p["bytes"] for p in tight["parts"])
    status, roomy, _ = call(f"{url}/api/plan", "POST", {**base, "seq": 64})
    assert roomy["fits"] is True and roomy["longest_seq"] >= 64 and "llama-3.1-8b" in roomy["text"]
    for field, value in [("model", "gpt-9"), ("vram", "lots"), ("seq", 0), ("seq", 1 << 21), ("lora_r", "x")]:
        status, got, message = error_of(call(f"{url}/api/plan", "POST", {**base, field: value}))
        assert (status, got) == (400, field), message
    assert error_of(call(f"{url}/api/plan", "POST", {**base, "quant": "q3"}))[:2] == (400, "quant")
    assert error_of(call(f"{url}/api/plan", "POST", {**base, "batch": True}))[:2] == (400, "batch")
    # Checkpointing on: the activations shrink, and the plan is what `qtune plan --gradient-checkpointing on` says.
    _, checkpointed, _ = call(f"{url}/api/plan", "POST", {**base, "gradient_checkpointing": "on"})
    activations = {p["name"]: p["bytes"] for p in checkpointed["parts"]}["activations"]
    assert activations < {p["name"]: p["bytes"] for p in tight["parts"]}["activations"]
    assert "checkpointing on" in checkpointed["text"]
    bad = {**base, "gradient_checkpointing": "yes"}
    assert error_of(call(f"{url}/api/plan", "POST", bad))[:2] == (400, "gradient_checkpointing")


def test_run_studio_refuses_a_folder_outside_the_project_and_an_open_host_without_token(tmp_path):
    from qtune.errors import ConfigError
    from qtune.studio.app import run_studio

    with pytest.raises(ConfigError, match="--dir ../elsewhere: .* outside the project folder"):
        run_studio(tmp_path, "../elsewhere")
    with pytest.raises(ConfigError, match="--host 0.0.0.0 .* --token"):
        run_studio(tmp_path, "adapters", host="0.0.0.0")
    assert not (tmp_path / "adapters").exists()
