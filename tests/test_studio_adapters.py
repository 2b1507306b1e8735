"""The studio's adapters and playground, through HTTP: a project folder with a tiny base, a real SFT adapter (loss
curves, samples) and a real classifier (confusion matrix) trained in-process for a few steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from qtune.config import load_config
from qtune.serve.app import ServerThread
from qtune.studio import jobs, playground
from qtune.studio.adapters import list_adapters
from qtune.studio.app import create_studio_app
from qtune.studio.common import ApiError, Studio
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
TEXTS = [("the movie was great", "pos"), ("a dull boring film", "neg"), ("wonderful film", "pos")] * 3


def train(project: Path, base: Path) -> Path:
    """adapters/chat (SFT, evaluated: samples and both loss curves) and adapters/cls (a classifier)."""
    from recipes import classify, sft

    out = project / "adapters"
    chat_data = write_jsonl(project / "train.jsonl", ROWS)
    cls_data = write_jsonl(project / "labels.jsonl", [{"text": t, "label": label} for t, label in TEXTS])
    common = [f"model.name={base}", "model.dtype=fp32", "quant.method=none", "lora.r=4", "train.batch_size=4"]
    common += ["train.max_steps=3", "train.lr=1e-2", "train.logging_steps=1", "train.report_to=none"]
    common += [f"output.dir={out}"]
    sft.main(
        load_config(
            None,
            [
                *common,
                f"data.train={chat_data}",
                f"data.eval={chat_data}",
                "train.eval_every=2",
                "eval.max_new_tokens=3",
            ]
            + ["output.name=chat"],
        )
    )
    classify.main(
        load_config(
            None,
            [*common, "recipe=classify", f"data.train={cls_data}", f"data.eval={cls_data}", "output.name=cls"],
        )
    )
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory, chatml_tokenizer):
    root = tmp_path_factory.mktemp("studio")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTUNE_HOME", str(root / ".qtune-home"))
        base = make_model_folder(root / "models" / "tiny", chatml_tokenizer)
        out = train(root, base)
    # Folders the list must not show, and one it must skip with its reason.
    for hidden in ("exports", "chat.checkpoints", "chat.runs", ".studio"):
        (out / hidden).mkdir(exist_ok=True)
    shutil.copytree(out / "chat", out / "chat.hub")  # as a push --dry-run leaves it: no adapter of its own
    shutil.copytree(out / "chat", out / "broken")
    (out / "broken" / "qtune.json").write_text("{not json")
    return {"root": root.resolve(), "base": base.resolve(), "dir": out.resolve()}


@pytest.fixture(scope="module")
def server(project):
    studio = Studio(project["root"], project["dir"], quant="none", dtype="fp32")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTUNE_HOME", str(project["root"] / ".qtune-home"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        with ServerThread(create_studio_app(studio)) as url:
            yield url, studio
        playground.close(studio)


@pytest.fixture
def fresh(project, tmp_path, monkeypatch):
    """A project of its own holding a copy of the chat adapter, its studio served: (url, studio)."""
    monkeypatch.setenv("QTUNE_HOME", str(project["root"] / ".qtune-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = (tmp_path / "p").resolve()
    shutil.copytree(project["dir"] / "chat", root / "adapters" / "chat")
    studio = Studio(root, root / "adapters", quant="none", dtype="fp32")
    with ServerThread(create_studio_app(studio)) as url:
        yield url, studio


def edit_meta(folder: Path, **sections) -> None:
    """Rewrite qtune.json of an adapter folder with `sections` replaced (NaN written as Python's json does)."""
    meta = json.loads((folder / "qtune.json").read_text())
    (folder / "qtune.json").write_text(json.dumps({**meta, **sections}))


def call(url: str, method: str = "GET", body: dict | None = None, raw: bool = False):
    """(status, parsed JSON or bytes) of one request; state-changing ones as JSON, as the page sends them."""
    data = json.dumps(body or {}).encode() if method != "GET" else None
    headers = {"Content-Type": "application/json"} if method != "GET" else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            status, content = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, content = e.code, e.read()
    return status, content if raw else json.loads(content)


def wait(fn, seconds: float = 180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = fn()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError("timed out")


# ---------------------------------------------------------------- adapters


def test_the_list_shows_each_adapter_and_skips_what_cannot_be_read(server, project):
    url, _ = server
    status, body = call(f"{url}/api/adapters")
    assert status == 200
    assert sorted(a["name"] for a in body["adapters"]) == ["chat", "cls"]
    assert [s["name"] for s in body["skipped"]] == ["broken"]
    assert "qtune.json: not valid JSON" in body["skipped"][0]["reason"]
    chat = next(a for a in body["adapters"] if a["name"] == "chat")
    assert chat["kind"] == "causal_lm" and chat["base"] == str(project["base"])
    assert chat["method"] == "LoRA r=4, fp32"
    assert (chat["data"], chat["examples"], chat["steps"]) == ("train.jsonl", len(ROWS), 3)
    assert chat["metrics"]["loss"] > 0 and isinstance(chat["created"], float)
    cls = next(a for a in body["adapters"] if a["name"] == "cls")
    assert cls["kind"] == "classifier" and cls["data"] == "labels.jsonl" and 0 <= cls["metrics"]["accuracy"] <= 1


def test_details_hold_curves_samples_confusion_and_files(server, project):
    url, _ = server
    status, chat = call(f"{url}/api/adapters/chat")
    assert status == 200
    assert [p[0] for p in chat["loss"]] == [1, 2, 3] and [p[0] for p in chat["eval_loss"]] == [2, 3]
    assert chat["confusion"] is None
    assert len(chat["samples"]) == len(ROWS)
    assert {s["reference"] for s in chat["samples"]} == {"positive", "negative"}
    assert all(isinstance(s["answer"], str) and isinstance(s["row"], int) for s in chat["samples"])
    assert chat["config"]["lora"]["r"] == 4
    files = {f["name"]: f["size"] for f in chat["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "qtune.json", "loss.png"} <= set(files)
    assert files["qtune.json"] == (project["dir"] / "chat" / "qtune.json").stat().st_size

    _, cls = call(f"{url}/api/adapters/cls")
    assert cls["confusion"]["labels"] == ["neg", "pos"]
    assert sum(map(sum, cls["confusion"]["matrix"])) == len(TEXTS)

    status, png = call(f"{url}/api/adapters/chat/loss.png", raw=True)
    assert status == 200 and png == (project["dir"] / "chat" / "loss.png").read_bytes()
    assert call(f"{url}/api/adapters/nothing")[0] == 404
    assert call(f"{url}/api/adapters/exports")[0] == 404  # not an adapter: hidden
    status, body = call(f"{url}/api/adapters/..x")
    assert status == 400 and "not a plain name" in body["error"]["message"]
    status, body = call(f"{url}/api/adapters/broken")
    assert status == 400 and "not valid JSON" in body["error"]["message"]


def test_delete_removes_the_folder_refuses_a_training_one_and_a_link(server, project, tmp_path):
    url, _ = server
    out = project["dir"]
    shutil.copytree(out / "chat", out / "victim")
    assert call(f"{url}/api/adapters/victim", "DELETE") == (200, {"deleted": True})
    assert not (out / "victim").exists()
    assert call(f"{url}/api/adapters/victim", "DELETE")[0] == 404

    # A run training into it: its progress file's latest begin is this (live) process's, with no end.
    shutil.copytree(out / "chat", out / "busy")
    progress = out / "busy.checkpoints" / "progress.jsonl"
    progress.parent.mkdir()
    progress.write_text(json.dumps({"event": "begin", "time": time.time(), "step": 0, "pid": os.getpid()}) + "\n")
    status, body = call(f"{url}/api/adapters/busy", "DELETE")
    assert status == 409 and "training" in body["error"]["message"]
    assert (out / "busy" / "qtune.json").is_file()
    shutil.rmtree(out / "busy.checkpoints")
    shutil.rmtree(out / "busy")

    elsewhere = shutil.copytree(out / "chat", tmp_path / "elsewhere")
    (out / "link").symlink_to(elsewhere)
    try:
        status, body = call(f"{url}/api/adapters/link", "DELETE")
        assert status == 400 and "is a link" in body["error"]["message"]
        assert (elsewhere / "qtune.json").is_file()
    finally:
        (out / "link").unlink()


def test_export_jobs_write_a_peft_folder_and_a_gguf_lora_file(server, project):
    url, studio = server
    for body, field in (({"format": "onnx"}, "format"), ({"format": "gguf", "type": "q4"}, "type")):
        status, error = call(f"{url}/api/adapters/chat/export", "POST", body)
        assert status == 400 and error["error"]["field"] == field
    assert call(f"{url}/api/adapters/nothing/export", "POST", {"format": "peft"})[0] == 404

    jobs = {}
    for fmt in ("peft", "gguf-lora"):
        status, body = call(f"{url}/api/adapters/chat/export", "POST", {"format": fmt})
        assert status == 202
        jobs[fmt] = body["job"]
    # The same output while its job runs: refused (the export writes atomically, so nothing is there yet).
    assert call(f"{url}/api/adapters/chat/export", "POST", {"format": "peft"})[0] == 409
    done = {}
    for fmt, job in jobs.items():
        done[fmt] = wait(lambda job=job: (r := call(f"{url}/api/jobs/{job}")[1])["state"] != "running" and r)
    assert done["peft"]["state"] == "done", done["peft"]["log"]
    assert done["peft"]["out"] == "adapters/exports/chat-peft"
    peft_dir = project["root"] / done["peft"]["out"]
    assert json.loads((peft_dir / "adapter_config.json").read_text())["r"] == 4
    assert done["gguf-lora"]["state"] == "done", done["gguf-lora"]["log"]
    assert (project["root"] / done["gguf-lora"]["out"]).read_bytes()[:4] == b"GGUF"
    assert "export written to" in done["peft"]["log"]

    status, body = call(f"{url}/api/adapters/chat/export", "POST", {"format": "peft"})
    assert status == 409 and "delete it first" in body["error"]["message"]
    assert call(f"{url}/api/jobs/ffffffffffff")[0] == 404

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(project["base"]), str(peft_dir))


def test_a_classifier_is_not_exported_and_a_failed_export_names_the_error(server):
    url, studio = server
    status, body = call(f"{url}/api/adapters/cls/export", "POST", {"format": "gguf-lora"})
    assert status == 400 and body["error"]["field"] == "format" and "classification adapter" in body["error"]["message"]
    # An exports folder that is a file: a 409 saying so, not a 500.
    exports = studio.dir / "exports"
    moved = exports.rename(studio.dir.parent / "exports-aside") if exports.exists() else None
    exports.write_text("not a folder")
    try:
        status, body = call(f"{url}/api/adapters/chat/export", "POST", {"format": "gguf-lora"})
        assert status == 409 and "exports: cannot hold exports" in body["error"]["message"]
    finally:
        exports.unlink()
        if moved:
            moved.rename(exports)
    # A job that fails once started (the adapter's weights are truncated) says why.
    broken = studio.dir / "truncated"
    shutil.copytree(studio.dir / "chat", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    try:
        status, body = call(f"{url}/api/adapters/truncated/export", "POST", {"format": "peft"})
        assert status == 202, body
        job = wait(lambda: (r := call(f"{url}/api/jobs/{body['job']}")[1])["state"] != "running" and r)
        assert job["state"] == "failed" and job["out"] is None and "adapter_model.safetensors" in job["error"]
    finally:
        shutil.rmtree(broken)
        shutil.rmtree(studio.dir / "exports" / "truncated-peft", ignore_errors=True)


def test_push_preview_shows_the_card_and_files_offline(server, project):
    url, studio = server
    status, body = call(f"{url}/api/adapters/chat/push-preview", "POST", {"repo_id": "alice/chat", "license": "mit"})
    assert status == 200
    assert "# chat" in body["card"] and str(project["base"]) in body["card"] and "license: mit" in body["card"]
    names = [f["name"] for f in body["files"]]
    assert {"README.md", "adapter_model.safetensors", "qtune.json"} <= set(names)
    assert not list(studio.state_dir.glob("push-preview-*"))  # the staging folder is gone
    assert not (project["dir"] / "chat.hub" / ".qtune-dry-run").exists()  # not staged beside the adapter
    for repo_id in ("nope", "a/b/c", "-bad/name", 3):
        status, body = call(f"{url}/api/adapters/chat/push-preview", "POST", {"repo_id": repo_id})
        assert status == 400 and body["error"]["field"] == "repo_id"
    status, body = call(f"{url}/api/adapters/chat/push-preview", "POST", {"repo_id": "alice/chat", "license": 1})
    assert status == 400 and body["error"]["field"] == "license"


# ---------------------------------------------------------------- playground


def sse(url: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed completion, read as they arrive."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    chunks = []
    with urllib.request.urlopen(request, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


def test_the_playground_loads_streams_classifies_and_picks_up_new_adapters(server, project):
    url, studio = server
    status, body = call(f"{url}/v1/models")
    assert status == 503 and body["error"]["message"] == playground.NOT_LOADED
    assert call(f"{url}/api/playground")[1]["state"] == "idle"

    status, body = call(f"{url}/api/playground/load", "POST")
    assert status == 202 and body["state"] in ("loading", "ready")
    state = wait(lambda: (r := call(f"{url}/api/playground")[1])["state"] not in ("idle", "loading") and r)
    assert state["state"] == "ready", state["error"]
    assert state["base"] == str(project["base"])  # the newest causal-LM adapter's base: inside the project
    models = {m["id"]: m["kind"] for m in state["models"]}
    assert models == {"base": "causal_lm", "chat": "causal_lm", "cls": "classifier"}
    assert [s["name"] for s in state["skipped"]] == ["broken"]

    for model in ("base", "chat"):
        ask = {"model": model, "messages": [{"role": "user", "content": "review: great"}], "max_tokens": 8}
        status, whole = call(f"{url}/v1/chat/completions", "POST", {**ask, "temperature": 0})
        assert status == 200
        chunks = sse(f"{url}/v1/chat/completions", {**ask, "temperature": 0, "stream": True})
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == whole["choices"][0]["message"]["content"]

    status, body = call(f"{url}/v1/classify", "POST", {"model": "cls", "input": ["the movie was great"]})
    assert status == 200
    result = body["data"][0]
    assert set(result["probabilities"]) == {"neg", "pos"} and result["label"] in ("neg", "pos")
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    hello = [{"role": "user", "content": "hi"}]
    status, body = call(f"{url}/v1/chat/completions", "POST", {"model": "ghost", "messages": hello})
    assert status == 404 and "ghost" in body["error"]["message"]
    too_long = {"model": "base", "messages": hello, "max_tokens": 10**6}
    status, body = call(f"{url}/v1/chat/completions", "POST", too_long)
    assert status == 400 and body["error"]["param"] == "max_tokens"
    # qtune serve's admin routes are not the studio's: nothing loads a folder from outside the project.
    for path in ("/admin/adapters", "/v1/../admin/adapters", "/v1/admin/adapters"):
        assert call(f"{url}{path}", "POST", {"name": "x", "path": "/"})[0] == 404
    assert call(f"{url}/health")[0] == 404

    # Trained after the load: registered by the next POST; deleted: gone from the pool too.
    shutil.copytree(project["dir"] / "chat", project["dir"] / "later")
    status, body = call(f"{url}/api/playground/load", "POST")
    assert status == 202 and "later" in {m["id"] for m in body["models"]}
    ask = {"model": "later", "messages": [{"role": "user", "content": "review: great"}], "max_tokens": 4}
    assert call(f"{url}/v1/chat/completions", "POST", ask)[0] == 200
    assert call(f"{url}/api/adapters/later", "DELETE")[0] == 200
    assert "later" not in {m["id"] for m in call(f"{url}/api/playground")[1]["models"]}
    assert call(f"{url}/v1/chat/completions", "POST", ask)[0] == 404


def test_a_base_outside_the_project_or_missing_fails_the_load_with_its_reason(project, tmp_path):
    elsewhere = tmp_path / "outside"
    shutil.copytree(project["dir"] / "chat", tmp_path / "p" / "adapters" / "chat")
    meta = json.loads((tmp_path / "p" / "adapters" / "chat" / "qtune.json").read_text())
    meta["config"]["model"]["name"] = str(elsewhere)
    (tmp_path / "p" / "adapters" / "chat" / "qtune.json").write_text(json.dumps(meta))
    studio = Studio(tmp_path / "p", tmp_path / "p" / "adapters", quant="none", dtype="fp32")
    with pytest.raises(ApiError, match="outside the project folder"):
        playground.choose_base(studio)

    studio.base = "models/missing"  # a folder of the project that is not there
    with ServerThread(create_studio_app(studio)) as url:
        assert call(f"{url}/api/playground/load", "POST")[0] == 202
        state = wait(lambda: (r := call(f"{url}/api/playground")[1])["state"] not in ("idle", "loading") and r)
        assert state["state"] == "failed" and "models/missing" in state["error"] and "\n" not in state["error"]
        assert call(f"{url}/v1/models")[0] == 503


# ---------------------------------------------------------------- hardening


def test_deleting_an_adapter_forgets_its_run(fresh):
    url, studio = fresh
    out = studio.dir
    # A run as the studio leaves it once finished: its records in .studio/, its checkpoints, its adapter.
    studio.state_dir.mkdir()
    record = {"command": ["train", ".studio/chat.yaml"], "pid": None, "started": time.time(), "exit_code": 0}
    (studio.state_dir / "chat.json").write_text(json.dumps(record))
    (studio.state_dir / "chat.yaml").write_text("output:\n  name: chat\n")
    (studio.state_dir / "chat.log").write_text("training\n")
    (out / "chat.checkpoints").mkdir()
    events = [{"event": "begin", "time": time.time(), "step": 0, "pid": None}, {"event": "end", "time": time.time()}]
    (out / "chat.checkpoints" / "progress.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert [(r["name"], r["state"]) for r in call(f"{url}/api/runs")[1]["runs"]] == [("chat", "finished")]

    assert call(f"{url}/api/adapters/chat", "DELETE") == (200, {"deleted": True})
    assert call(f"{url}/api/runs")[1]["runs"] == []  # gone, not listed as failed
    assert not (out / "chat.checkpoints").exists() and not list(studio.state_dir.glob("chat.*"))


def test_gguf_exports_of_each_type_go_to_their_own_folder(server, project):
    url, _ = server
    ids = {}
    for qtype in ("f16", "q8_0"):  # q8_0 while f16 runs: another output, not a 409
        status, body = call(f"{url}/api/adapters/chat/export", "POST", {"format": "gguf", "type": qtype})
        assert status == 202, body
        ids[qtype] = body["job"]
    for qtype, job in ids.items():
        done = wait(lambda job=job: (r := call(f"{url}/api/jobs/{job}")[1])["state"] != "running" and r)
        assert done["state"] == "done", done["log"]
        assert done["out"] == f"adapters/exports/chat-gguf-{qtype}"
        assert (project["root"] / done["out"] / f"chat-{qtype}.gguf").read_bytes()[:4] == b"GGUF"
    status, body = call(f"{url}/api/adapters/chat/export", "POST", {"format": "gguf", "type": "q8_0"})
    assert status == 409 and "chat-gguf-q8_0 exists" in body["error"]["message"]


def test_at_most_two_exports_run_at_once(server, tmp_path):
    url, studio = server
    running = [
        jobs.Job(
            f"job{i}", "chat", "peft", tmp_path / f"out{i}", tmp_path / f"{i}.log", subprocess.Popen(["sleep", "60"])
        )
        for i in range(jobs.MAX_EXPORTS)
    ]
    studio.jobs.update({j.id: j for j in running})
    try:
        status, body = call(f"{url}/api/adapters/chat/export", "POST", {"format": "gguf", "type": "f16"})
        assert status == 409
        assert "2 exports are running" in body["error"]["message"]
        assert "job0" in body["error"]["message"] and "job1" in body["error"]["message"]
    finally:
        for j in running:
            j.process.kill()
            j.process.wait()
            del studio.jobs[j.id]
    assert call(f"{url}/api/adapters/chat/export", "POST", {"format": "nope"})[0] == 400  # ended: not counted


def test_one_push_preview_at_a_time_and_its_staging_folder_goes_on_failure(server, monkeypatch):
    import qtune.hub
    from qtune.hub import HubError

    url, studio = server
    staging, release, calls = threading.Event(), threading.Event(), []

    def failing_push(adapter, repo_id, *, dry_run, out, license):
        calls.append(repo_id)
        Path(out).mkdir()
        (Path(out) / "adapter_model.safetensors").write_bytes(b"half a copy")
        if len(calls) == 1:
            staging.set()
            release.wait(60)
            raise HubError("staging failed")
        raise RuntimeError("a bug while staging")

    monkeypatch.setattr(qtune.hub, "push", failing_push)
    first: list = []
    thread = threading.Thread(
        target=lambda: first.append(call(f"{url}/api/adapters/chat/push-preview", "POST", {"repo_id": "a/one"}))
    )
    thread.start()
    try:
        assert staging.wait(60)
        status, body = call(f"{url}/api/adapters/cls/push-preview", "POST", {"repo_id": "a/two"})
        assert status == 409 and "another push preview" in body["error"]["message"]
    finally:
        release.set()
        thread.join(60)
    assert first[0][0] == 400 and first[0][1]["error"]["message"] == "staging failed"
    assert not list(studio.state_dir.glob("push-preview-*"))
    # Free again; a failure that is a bug is a 500, and still leaves nothing staged.
    status, body = call(f"{url}/api/adapters/chat/push-preview", "POST", {"repo_id": "a/three"})
    assert status == 500 and "a bug while staging" in body["error"]["message"]
    assert calls == ["a/one", "a/three"] and not list(studio.state_dir.glob("push-preview-*"))


def test_data_of_several_sources_is_named_as_the_model_card_names_it(fresh):
    url, studio = fresh
    folder = studio.dir / "chat"
    meta = json.loads((folder / "qtune.json").read_text())
    meta["config"]["data"]["train"] = [{"path": "/somewhere/else/a.jsonl"}, "data/b.jsonl", {"path": "org/set"}]
    del meta["data"]["train"]["file"]  # (as an adapter trained before the report named its files)
    (folder / "qtune.json").write_text(json.dumps(meta))
    assert call(f"{url}/api/adapters/chat")[1]["data"] == "a.jsonl + b.jsonl + org/set"


def test_malformed_qtune_json_values_and_nan_metrics_never_make_a_500(fresh):
    url, studio = fresh
    folder = studio.dir / "chat"
    nan, inf = float("nan"), float("inf")
    base = json.loads((folder / "qtune.json").read_text())["base"]
    edit_meta(
        folder,
        metrics={"loss": nan, "accuracy": inf, "eval_loss": 0.5},
        training={"steps": 3, "loss_curve": [[1, nan], [2, 1.0], "x"], "eval_loss_curve": 7},
        samples=[1, "x", {"prompt": "p", "answer": "a", "output": "b"}],
        data=["not", "an object"],
    )
    status, body = call(f"{url}/api/adapters")
    assert status == 200 and body["adapters"][0]["metrics"] == {"loss": None, "accuracy": None, "eval_loss": 0.5}
    status, chat = call(f"{url}/api/adapters/chat")
    assert status == 200, chat
    assert chat["loss"] == [[1, None], [2, 1.0]] and chat["eval_loss"] == []
    assert chat["samples"] == [{"prompt": "p", "reference": "a", "answer": "b", "row": None, "correct": None}]
    assert chat["data"] == "train.jsonl" and chat["examples"] is None  # (the name from the recorded config)
    for sections in (
        {"samples": 7, "metrics": [1, 2], "training": "long"},
        {
            "samples": {"a": 1},
            "metrics": {"confusion": nan, "labels": "x"},
            "base": {**base, "name": 5},
        },
    ):
        edit_meta(folder, **sections)
        status, body = call(f"{url}/api/adapters/chat")
        assert status == 200, body
        assert call(f"{url}/api/adapters")[0] == 200


def test_the_loss_curve_is_served_only_from_inside_the_project(fresh, tmp_path):
    url, studio = fresh
    png = studio.dir / "chat" / "loss.png"
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    png.unlink()
    png.symlink_to(outside)
    assert call(f"{url}/api/adapters/chat/loss.png", raw=True)[0] == 404


def with_base(folder: Path, name: str, when: float | None = None) -> None:
    meta = json.loads((folder / "qtune.json").read_text())
    meta["config"]["model"]["name"] = meta["base"]["name"] = name
    (folder / "qtune.json").write_text(json.dumps(meta))
    if when is not None:
        for file in ("qtune.json", "adapter_config.json"):
            os.utime(folder / file, (when, when))


def test_the_playground_base_comes_from_the_newest_adapter_the_list_shows(fresh):
    _, studio = fresh
    for folder in ("a", "b"):
        (studio.project / "models" / folder).mkdir(parents=True)
    with_base(studio.dir / "chat", "models/a", when=time.time() - 100)
    newer = shutil.copytree(studio.dir / "chat", studio.dir / "newer")
    with_base(newer, "models/b", when=time.time())
    assert playground.choose_base(studio) == str(studio.project / "models" / "b")
    (newer / "adapter_model.safetensors").unlink()  # the list skips it: so does the playground
    assert "newer" in {s["name"] for s in list_adapters(studio)[1]}
    assert playground.choose_base(studio) == str(studio.project / "models" / "a")


def test_the_playground_takes_a_base_for_a_hub_id_exactly_when_qtune_does(fresh, monkeypatch):
    import huggingface_hub

    from qtune.errors import ModelError
    from qtune.models import resolve_base

    _, studio = fresh
    root = studio.project
    (root / "org").mkdir()
    (root / "org" / "file").write_text("a file, not a model folder")
    (root / "org" / "dir").mkdir()

    asked: list[str] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, **kwargs: asked.append(name) or 1 / 0)
    monkeypatch.chdir(root)  # qtune train resolves a relative model.name from the project folder
    for name in ("org/model", "org/file", "org/dir", "org/model.v2", "models/tiny", "a/b/c", "./org/model"):
        with_base(studio.dir / "chat", name)
        asked.clear()
        with pytest.raises(ModelError):  # (no config.json in the folders, no hub here)
            resolve_base(name)
        from_hub = asked == [name]
        expected = name if from_hub else str((root / name).resolve())
        assert playground.choose_base(studio) == expected, name
