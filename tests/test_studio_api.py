"""qtune studio's JSON API over HTTP: runs started, watched, stopped and resumed through it (real `qtune train`
processes on a tiny model), runs started from a terminal, the security guard, and the planner."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from qtune.progress import process_start
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


@pytest.fixture(scope="module", autouse=True)
def offline():
    """The studio's `qtune train` children inherit the environment as it is: offline, as every test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


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


def past_step(url: str, name: str, step: int) -> dict:
    """Poll a running run until it is past `step` (a complete checkpoint behind it); fail, never hang."""
    running = watch(url, name, {"running", "finished", "failed"})
    deadline = time.monotonic() + DEADLINE_S
    while running["state"] == "running" and running["step"] < step:
        assert time.monotonic() < deadline, f"run {name} stayed at step {running['step']}\n{running['log_tail']}"
        time.sleep(0.2)
        running = call(f"{url}/api/runs/{name}")[1]
    assert running["state"] == "running", running["log_tail"]
    return running


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
    assert isinstance(record["pid_start"], int)  # with the pid, it names the process (a pid may be reused)

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
    running = past_step(url, "long", 3)  # a checkpoint (every 2 steps) is complete
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
    assert call(f"{url}/api/info", headers={"Origin": "null"})[0] == 403  # a sandboxed frame, a file: page
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{int(port) + 1}"):
        status, body, _ = call(f"{url}/api/runs", "POST", {"config": TINY, "values": {}}, {"Origin": origin})
        assert status == 403 and "Origin" in body["error"]["message"], origin  # a JSON POST from another site
    assert call(f"{url}/api/plan", "POST", {"model": "llama-3.1-8b"}, {"Origin": f"http://127.0.0.1:{port}"})[0] == 200
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
        body = {"model": "llama-3.1-8b", "vram": "8GB"}
        assert call(f"{url}/api/plan", "POST", body)[0] == 401
        assert call(f"{url}/api/plan", "POST", body, headers={"Authorization": "Bearer s3cret"})[0] == 200
        # The page loads without the token (it holds no data): it reads the token from the URL's #token=.
        page, html, _ = call(f"{url}/")
        assert page == 200 and "<html" in html.lower()
        assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
        assert assets and all(call(f"{url}{asset}")[0] == 200 for asset in assets), assets


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
    with pytest.raises(ConfigError, match="--host 0.0.0.0 .* --token .*--no-token is for loopback only"):
        run_studio(tmp_path, "adapters", host="0.0.0.0", no_token=True)
    with pytest.raises(ConfigError, match="--no-token and --token"):
        run_studio(tmp_path, "adapters", token="x", no_token=True)
    with pytest.raises(ConfigError, match="--dir ~nosuchuser/x: cannot resolve it"):
        run_studio(tmp_path, "~nosuchuser/x")
    assert not (tmp_path / "adapters").exists()


# ---------------------------------------------------------------- runs faked on disk, in a studio of their own

_FOLDERS = iter(range(1000))


@pytest.fixture()
def fresh(project):
    """A studio over an output folder of its own in the project, served: (studio, url)."""
    studio = Studio(project=project, dir=project / f"out-{next(_FOLDERS)}")
    studio.dir.mkdir()
    with ServerThread(create_studio_app(studio)) as url:
        yield studio, url


def sleeper() -> subprocess.Popen:
    """A live process that is not a training run (its pid stands in for one)."""
    return subprocess.Popen(["sleep", "120"])


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def fake_run(studio, name, *, pid, pid_start=None, exit_code=None, log="", checkpoint=False, config=False, **extra):
    """What a run the studio launched leaves in <dir>/.studio (and, with `checkpoint`, a complete checkpoint)."""
    studio.state_dir.mkdir(parents=True, exist_ok=True)
    record = {"command": ["train", f"{name}.yaml"], "pid": pid, "pid_start": pid_start, "started": time.time()}
    (studio.state_dir / f"{name}.json").write_text(json.dumps({**record, "exit_code": exit_code, **extra}))
    (studio.state_dir / f"{name}.log").write_text(log)
    if config:
        (studio.state_dir / f"{name}.yaml").write_text(CONFIG)
    if checkpoint:
        folder = studio.dir / f"{name}.checkpoints" / "checkpoint-2"
        folder.mkdir(parents=True)
        for file in ("adapter_model.safetensors", "trainer_state.json", "scheduler.pt", "optimizer.pt"):
            (folder / file).write_bytes(b"x")


def progress_file(studio, name, lines: list[dict]) -> Path:
    folder = studio.dir / f"{name}.checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "progress.jsonl"
    with path.open("a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)  # (NaN is written as JSON's Python dialect does)
    return path


def runs_of(url) -> dict[str, dict]:
    status, body, _ = call(f"{url}/api/runs")
    assert status == 200, body
    return {r["name"]: r for r in body["runs"]}


def test_forget_removes_a_runs_records_and_checkpoints_but_not_while_it_trains(fresh):
    from qtune.studio.common import ApiError
    from qtune.studio.runs import forget

    studio, url = fresh
    fake_run(studio, "gone", pid=dead_pid(), exit_code=1, log="error: boom\n", config=True)
    fake_run(studio, "half", pid=dead_pid(), exit_code=130, stopped=True, checkpoint=True, config=True)
    live = sleeper()
    try:
        fake_run(studio, "busy", pid=live.pid, pid_start=process_start(live.pid))
        assert {n: r["state"] for n, r in runs_of(url).items()} == {
            "gone": "failed",
            "half": "interrupted",
            "busy": "starting",
        }
        forget(studio, "gone")
        forget(studio, "half")
        with pytest.raises(ApiError) as refused:
            forget(studio, "busy")
        assert refused.value.status == 409 and "stop it first" in refused.value.message
        assert set(runs_of(url)) == {"busy"}
    finally:
        live.kill()
        live.wait()
    assert not list(studio.state_dir.glob("gone.*")) and not list(studio.state_dir.glob("half.*"))
    assert not (studio.dir / "half.checkpoints").exists()
    forget(studio, "busy")
    assert runs_of(url) == {}


def test_a_record_or_a_begin_naming_a_reused_pid_is_no_live_run(fresh):
    studio, url = fresh
    me = os.getpid()  # alive, but not the process that started at the recorded time
    fake_run(studio, "stale", pid=me, pid_start=process_start(me) + 1)
    begin = {"event": "begin", "time": time.time(), "step": 0, "max_steps": 10, "pid": me}
    progress_file(studio, "term", [{**begin, "pid_start": process_start(me) + 1}])
    live = sleeper()
    try:
        fake_run(studio, "live", pid=live.pid, pid_start=process_start(live.pid))
        runs = runs_of(url)
        assert runs["stale"]["state"] == "failed" and runs["stale"]["error"] == "ended before its first checkpoint"
        assert runs["term"]["state"] == "failed" and runs["term"]["eta_s"] is None
        assert runs["live"]["state"] == "starting"
    finally:
        live.kill()
        live.wait()


def test_a_crash_after_a_checkpoint_shows_its_error_and_a_stop_before_one_says_so(fresh):
    studio, url = fresh
    crash = "step 3\nTraceback (most recent call last):\nRuntimeError: CUDA out of memory\n\n"
    fake_run(studio, "crashed", pid=dead_pid(), exit_code=1, log=crash, checkpoint=True, config=True)
    fake_run(studio, "said", pid=dead_pid(), exit_code=1, log="error: data.train: no such file\nmore\n")
    fake_run(studio, "early", pid=dead_pid(), exit_code=130, stopped=True, log="loading\n")
    fake_run(studio, "killed", pid=dead_pid(), exit_code=-9, stopped=True, checkpoint=True, config=True)
    fake_run(studio, "ctrl-c", pid=dead_pid(), exit_code=130, checkpoint=True, config=True)
    runs = runs_of(url)
    assert runs["crashed"]["state"] == "interrupted" and runs["crashed"]["resumable"]
    assert runs["crashed"]["error"] == "RuntimeError: CUDA out of memory"
    assert (runs["said"]["state"], runs["said"]["error"]) == ("failed", "data.train: no such file")
    assert (runs["early"]["state"], runs["early"]["error"]) == ("failed", "stopped before its first checkpoint")
    assert (runs["killed"]["state"], runs["killed"]["error"]) == ("interrupted", None)
    assert (runs["ctrl-c"]["state"], runs["ctrl-c"]["error"]) == ("interrupted", None)


def test_at_most_two_runs_train_at_once(fresh):
    from qtune.studio.runs import MAX_ACTIVE_RUNS

    studio, url = fresh
    assert MAX_ACTIVE_RUNS == 2
    sleepers = [sleeper(), sleeper()]
    try:
        for name, process in zip(["one", "two"], sleepers, strict=True):
            fake_run(studio, name, pid=process.pid, pid_start=process_start(process.pid))
        fake_run(studio, "paused", pid=dead_pid(), exit_code=130, checkpoint=True, config=True)
        status, field, message = error_of(start(url, {"output.name": "third"}))
        assert status == 409 and "one, two" in message and "at most 2" in message, message
        status, body, _ = call(f"{url}/api/runs/paused/resume", "POST")
        assert status == 409 and "one, two" in body["error"]["message"]
        assert not (studio.state_dir / "third.yaml").exists()
    finally:
        for process in sleepers:
            process.kill()
            process.wait()


def test_resuming_a_run_started_from_a_terminal_checks_its_paths(fresh, project):
    from qtune.config import load_config, to_dict

    studio, url = fresh
    tree = to_dict(load_config(project / "configs" / "tiny.yaml", [f"output.dir={studio.relative(studio.dir)}"]))
    tree["output"]["name"] = "t"
    tree["data"]["chat_template"] = "../outside.j2"
    begin = {"event": "begin", "time": time.time(), "step": 0, "max_steps": 6, "pid": dead_pid(), "pid_start": 1}
    progress_file(studio, "t", [{**begin, "cwd": str(project), "config": tree}])
    fake_checkpoint = studio.dir / "t.checkpoints" / "checkpoint-2"
    fake_checkpoint.mkdir()
    for file in ("adapter_model.safetensors", "trainer_state.json", "scheduler.pt", "optimizer.pt"):
        (fake_checkpoint / file).write_bytes(b"x")
    run = call(f"{url}/api/runs/t")[1]
    assert run["state"] == "interrupted" and run["resumable"] and not run["studio"], run
    assert error_of(call(f"{url}/api/runs/t/resume", "POST"))[:2] == (400, "data.chat_template")
    assert not (studio.state_dir / "t.yaml").exists() and not (studio.state_dir / "t.json").exists()


def test_every_chat_template_file_is_checked_not_only_jinja(project):
    from qtune.config import load_config
    from qtune.studio.common import ApiError
    from qtune.studio.configs import check_paths

    studio = Studio(project=project, dir=project / "adapters")
    for template in ("../t.txt", "../t.j2", "/etc/hostname", "~/template", "~nosuchuser/t"):
        cfg = load_config(project / "configs" / "tiny.yaml")
        cfg.data.chat_template = template
        with pytest.raises(ApiError) as refused:
            check_paths(studio, cfg)
        assert (refused.value.status, refused.value.field) == (400, "data.chat_template"), template
    for template in ("base", "chatml", "llama-3"):
        cfg = load_config(project / "configs" / "tiny.yaml")
        cfg.data.chat_template = template
        check_paths(studio, cfg)


def test_bad_values_in_progress_records_and_metadata_do_not_break_the_runs_list(fresh):
    studio, url = fresh
    fake_run(studio, "odd", pid=dead_pid(), exit_code=130, checkpoint=True, config=True, started="noon")
    begin = {"event": "begin", "time": "yesterday", "step": 0, "max_steps": "many", "pid": dead_pid()}
    progress_file(
        studio,
        "odd",
        [
            begin,
            {"event": "log", "time": "later", "step": 1, "loss": 2.5, "eval_loss": float("nan")},
            {"event": "log", "time": 1.0, "step": 2, "loss": float("inf")},
        ],
    )
    (studio.dir / "done").mkdir()
    meta = {"training": {"steps": 2, "seconds": float("nan"), "loss_curve": [[1, 2.0], [2, float("nan")]]}}
    (studio.dir / "done" / "qtune.json").write_text(json.dumps(meta))
    runs = runs_of(url)
    odd = runs["odd"]
    assert odd["state"] == "interrupted" and odd["elapsed_s"] is None and odd["eta_s"] is None
    assert odd["loss"] == [[1, 2.5]] and odd["eval_loss"] == [] and odd["max_steps"] is None
    done = runs["done"]
    assert done["state"] == "finished" and done["loss"] == [[1, 2.0]] and done["elapsed_s"] is None
    assert call(f"{url}/api/runs/odd")[0] == 200


def test_the_routes_run_off_the_event_loop_and_read_a_progress_file_once_per_change(fresh, monkeypatch):
    import asyncio

    from qtune.studio import configs, plan, records, runs

    studio, url = fresh
    on_the_loop: list[str] = []

    def watched(fn):
        def wrapper(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_the_loop.append(fn.__name__)
            except RuntimeError:
                pass
            return fn(*args, **kwargs)

        return wrapper

    for module, name in [(runs, "list_runs"), (runs, "details"), (runs, "start"), (runs, "stop"), (runs, "resume")]:
        monkeypatch.setattr(module, name, watched(getattr(module, name)))
    for module, name in [(configs, "list_configs"), (configs, "form_keys"), (plan, "plan")]:
        monkeypatch.setattr(module, name, watched(getattr(module, name)))
    reads: list[Path] = []
    read = records.read_progress
    monkeypatch.setattr(records, "read_progress", lambda path: reads.append(path) or read(path))

    begin = {"event": "begin", "time": time.time(), "step": 0, "max_steps": 6, "pid": dead_pid()}
    path = progress_file(studio, "p", [begin, {"event": "log", "time": time.time(), "step": 1, "loss": 1.5}])
    assert runs_of(url)["p"]["loss"] == [[1, 1.5]]
    runs_of(url)
    assert call(f"{url}/api/runs/p")[1]["loss"] == [[1, 1.5]]
    assert reads == [path]  # one parse for two lists and a detail: unchanged, and _config_of reuses it
    progress_file(studio, "p", [{"event": "log", "time": time.time(), "step": 2, "loss": 1.25}])
    assert runs_of(url)["p"]["loss"] == [[1, 1.5], [2, 1.25]] and len(reads) == 2

    assert call(f"{url}/api/configs")[0] == 200 and call(f"{url}/api/configs/{TINY}")[0] == 200
    assert call(f"{url}/api/plan", "POST", {"model": "llama-3.1-8b"})[0] == 200
    assert error_of(start(url, {"output.name": "x", "train.lr": "abc"}))[0] == 400
    assert call(f"{url}/api/runs/p/stop", "POST")[0] == 409 and call(f"{url}/api/runs/p/resume", "POST")[0] == 409
    assert on_the_loop == []


def test_paths_through_links_unknown_homes_and_reserved_names_are_400s(url, project, tmp_path):
    (tmp_path / "outside.jsonl").write_text((project / "train.jsonl").read_text())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text((project / "model" / "config.json").read_text())
    (project / "linked.jsonl").symlink_to(tmp_path / "outside.jsonl")
    (project / "linked-model").symlink_to(tmp_path / "model")
    cases = [
        ({"output.name": "x", "data.train": "linked.jsonl"}, "data.train"),
        ({"output.name": "x", "model.name": "linked-model"}, "model.name"),
        ({"output.name": "x", "data.train": "~nosuchuser/train.jsonl"}, "data.train"),
        ({"output.name": "x", "model.name": "~nosuchuser/model"}, "model.name"),
        ({"output.name": "exports"}, "output.name"),
        ({"output.name": ".studio"}, "output.name"),
        ({"output.name": "a.checkpoints"}, "output.name"),
        ({"output.name": "a.runs"}, "output.name"),
        ({"output.name": "a.hub"}, "output.name"),
        ({"output.name": "ok\n"}, "output.name"),
    ]
    for values, field in cases:
        status, got, message = error_of(start(url, values))
        assert (status, got) == (400, field), (values, message)
    assert "reserved" in error_of(start(url, {"output.name": "exports"}))[2]
    body = {"model": "~nosuchuser/model", "vram": "8GB"}
    assert error_of(call(f"{url}/api/plan", "POST", body))[:2] == (400, "model")
    assert not any((project / "adapters" / n).exists() for n in ("x", "exports", "a.checkpoints"))


def test_the_planner_reads_a_project_folder_named_like_a_hub_id_never_the_hub(url, project, monkeypatch):
    import huggingface_hub

    def fetch(*args, **kwargs):
        raise AssertionError("the planner reached for the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    (project / "acme" / "tiny").mkdir(parents=True, exist_ok=True)
    (project / "acme" / "tiny" / "config.json").write_text((project / "model" / "config.json").read_text())
    status, planned, _ = call(f"{url}/api/plan", "POST", {"model": "acme/tiny", "vram": "8GB", "seq": 64})
    assert status == 200 and planned["fits"] is True, planned


def test_spawn_leaves_the_hub_setting_to_the_user(project, monkeypatch, tmp_path):
    from qtune.studio import common

    seen: list[dict] = []
    monkeypatch.setattr(common.subprocess, "Popen", lambda *args, **kwargs: seen.append(kwargs["env"]))
    studio = Studio(project=project, dir=project / "adapters")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    common.spawn(studio, ["train", "x.yaml"], tmp_path / "log")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    common.spawn(studio, ["train", "x.yaml"], tmp_path / "log")
    assert "HF_HUB_OFFLINE" not in seen[0] and seen[1]["HF_HUB_OFFLINE"] == "0"


def test_a_restarted_studio_stops_the_run_an_earlier_one_launched(url, studio, project):
    status, run, _ = start(url, {"output.name": "orphan", "train.max_steps": "40"})
    assert status == 201, run
    past_step(url, "orphan", 3)
    later = Studio(project=project, dir=project / "adapters")  # the studio restarted: its processes are not ours
    with ServerThread(create_studio_app(later)) as second:
        status, stopping, _ = call(f"{second}/api/runs/orphan/stop", "POST")
        assert status == 202 and stopping["state"] == "stopping", stopping
        stopped = watch(second, "orphan", {"interrupted", "failed", "finished"})
        assert stopped["state"] == "interrupted" and stopped["resumable"] and stopped["error"] is None, stopped
    assert studio.processes["orphan"].process.wait(timeout=DEADLINE_S) == 130
    assert watch(url, "orphan", {"interrupted", "failed", "finished"})["state"] == "interrupted"


def test_studio_makes_a_token_by_default_and_prints_the_page_with_it(tmp_path, monkeypatch, capsys):
    import uvicorn

    from qtune.studio.app import run_studio

    served = []

    class Served(BaseException):
        pass

    def run(app, host, port, **kwargs):
        served.append(app)
        raise Served

    monkeypatch.setattr(uvicorn, "run", run)
    with pytest.raises(Served):
        run_studio(tmp_path, "adapters", port=7861)
    printed = capsys.readouterr().out
    token = printed.split("#token=", 1)[1].split()[0]
    assert "open http://127.0.0.1:7861/#token=" in printed and len(token) >= 20
    with ServerThread(served[0]) as url:
        assert call(f"{url}/api/info")[0] == 401
        assert call(f"{url}/api/info", headers={"Authorization": f"Bearer {token}"})[1]["token_required"] is True
    with pytest.raises(Served):
        run_studio(tmp_path, "adapters", no_token=True)
    assert "#token" not in capsys.readouterr().out
    with ServerThread(served[1]) as url:
        assert call(f"{url}/api/info")[1]["token_required"] is False


def test_one_check_before_serve_and_studio_listen_and_configs_without_the_cli():
    from qtune.errors import ConfigError
    from qtune.serve.app import check_server_launch

    with pytest.raises(ConfigError, match=r"--host 0.0.0.0 .* --token \(or QTUNE_SERVE_TOKEN\) so that the admin"):
        check_server_launch("serve", "0.0.0.0", None, "QTUNE_SERVE_TOKEN", "the admin routes are protected")
    check_server_launch("serve", "127.0.0.1", None, "QTUNE_SERVE_TOKEN", "the admin routes are protected")
    code = "import sys\nfrom qtune.studio import configs\nconfigs.shipped_folder()\n"
    code += "assert 'qtune.cli' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
