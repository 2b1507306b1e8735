"""qtune push and load-by-id, through the real huggingface_hub client over real HTTP to a loopback hub.

The hub is tests/hub_server.py (Starlette + uvicorn on 127.0.0.1). huggingface_hub reads HF_ENDPOINT,
HF_HUB_OFFLINE and friends once, at import; qtune reads the environment at call time and passes
endpoint, cache and offline mode explicitly, so the `hub` fixture sets the environment and, for the
client's own import-time switches, the matching `huggingface_hub.constants`. A socket guard fails any
test that looks up or connects to anything but loopback.
"""

import json
import logging
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants

from qtune import hub as qhub
from qtune.cli import main
from qtune.config import load_config
from qtune.errors import AdapterError
from recipes import sft
from tests.conftest import CHATML, make_model_folder, make_tokenizer
from tests.hub_server import HubServer
from tests.test_train import ROWS

# huggingface_hub's plain-LFS upload (lfs.py) hands httpx2 a file as `data=`, which httpx2 deprecates: upstream.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

SECRET = "hf_qtuneTestSecret7f3a9c"  # the token under test: it may appear in Authorization headers only
UPLOADS = {"adapter_config.json", "adapter_model.safetensors", "qtune.json", "loss.png", "README.md"}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A causal-LM adapter trained 2 steps on a tiny random Llama (a local base folder)."""
    root = tmp_path_factory.mktemp("hub-adapter")
    tokenizer = make_tokenizer(CHATML)
    base = make_model_folder(root / "tiny-llama", tokenizer)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTUNE_HOME", str(root / "qtune-home"))
        cfg = load_config(
            None,
            [
                f"model.name={base}",
                "model.dtype=fp32",
                "quant.method=none",
                f"data.train={data}",
                f"data.eval={data}",
                "eval.max_new_tokens=2",
                "train.max_steps=2",
                "train.batch_size=4",
                "lora.r=4",
                f"output.dir={root / 'adapters'}",
                "output.name=tiny",
            ],
        )
        return sft.main(cfg)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Refuse, and fail the test on, any name lookup or connection that is not for loopback."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    refused = []

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost", None):
            refused.append(host)
            raise socket.gaierror(f"test guard: no traffic beyond loopback ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            refused.append(address)
            raise ConnectionRefusedError(f"test guard: no traffic beyond loopback ({address})")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert refused == []


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A loopback hub where SECRET is alice's token; HF_* point at it, an empty cache, no stored login."""
    server = HubServer(tmp_path / "hub-storage", tokens={SECRET: "alice"}).start()
    for name, value in {
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": SECRET,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # The client's import-time switches: online, the plain LFS upload route (the server has no xet
    # storage), no telemetry or agent-registry calls (they go to huggingface.co), and no token stored
    # by a real `hf auth login`.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # push's staging folder: under tmp_path too
    yield server
    server.stop()


def go_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def error_line(capsys, argv) -> str:
    """Run the CLI, expect exit 2 and exactly one `error:` line; return it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def uploads(server) -> list[str]:
    """The requests that create or change something on the hub."""
    return [f"{r.method} {r.path}" for r in server.requests if r.method in ("POST", "PUT") and "validate" not in r.path]


# ---------------------------------------------------------------- push


def test_push_uploads_exactly_the_staged_files(adapter, hub, capsys, tmp_path):
    main(["push", str(adapter), "alice/tiny", "--base-model", "alice/tiny-llama", "--license", "mit"])
    out = capsys.readouterr().out
    assert f"pushed {adapter} to {hub.url}/alice/tiny (main, commit " in out
    for name in UPLOADS:
        assert name in out

    files = hub.files("alice/tiny")
    assert set(files) == UPLOADS | {".gitattributes"}  # .gitattributes: the hub's initial commit
    for name in ("adapter_model.safetensors", "loss.png"):
        assert files[name] == (adapter / name).read_bytes()
    assert not list(tmp_path.glob("qtune-push-*"))  # the staging folder is removed

    # What went over the wire: refs (no repo yet), create, preupload, LFS batch, the two LFS uploads and
    # verifies (in threads, so in any order), the commit. validate-yaml checks the card's front matter.
    paths = [f"{r.method} {r.path}" for r in hub.requests if "validate-yaml" not in r.path]
    lfs = sorted(p for p in paths if p.startswith("PUT /_lfs/alice/tiny/"))
    assert paths[:4] == [
        "GET /api/models/alice/tiny/refs",
        "POST /api/repos/create",
        "POST /api/models/alice/tiny/preupload/main",
        "POST /alice/tiny.git/info/lfs/objects/batch",
    ]
    assert sorted(paths[4:-1]) == [*(["POST /_lfs/alice/tiny/verify"] * 2), *lfs]
    assert paths[-1] == "POST /api/models/alice/tiny/commit/main"
    assert len(lfs) == 2
    assert json.loads(hub.calls("POST", "/repos/create")[0].body) == {
        "name": "tiny",
        "organization": "alice",
        "visibility": "public",
    }
    (commit,) = hub.calls("POST", "/commit/main")
    ops = {
        json.loads(line)["key"] + " " + json.loads(line)["value"].get("path", "") for line in commit.body.splitlines()
    }
    assert ops == {
        "header ",
        "lfsFile adapter_model.safetensors",
        "lfsFile loss.png",
        "file adapter_config.json",
        "file qtune.json",
        "file README.md",
    }
    assert hub.repo("alice/tiny")["private"] is False

    # qtune.json as published: local paths cut to names; the base named by its hub id (--base-model).
    local = json.loads((adapter / "qtune.json").read_text())
    published = json.loads(files["qtune.json"])
    assert published["base"]["path"] == "tiny-llama" and published["data"]["train"]["file"] == "train.jsonl"
    assert published["config"]["data"]["train"] == "train.jsonl" and published["config"]["output"]["dir"] == "adapters"
    assert published["config"]["model"] == {**local["config"]["model"], "name": "alice/tiny-llama"}  # --base-model
    assert published["base"]["fingerprint"] == local["base"]["fingerprint"]
    assert published["metrics"] == local["metrics"] and published["versions"] == local["versions"]
    assert len(local["samples"]) == 8 and published["samples"] == []  # rows of the user's data stay home
    peft_config = json.loads(files["adapter_config.json"])
    assert peft_config["base_model_name_or_path"] == "alice/tiny-llama"
    assert {k: v for k, v in peft_config.items() if k != "base_model_name_or_path"} == {
        k: v
        for k, v in json.loads((adapter / "adapter_config.json").read_text()).items()
        if k != "base_model_name_or_path"
    }

    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "alice/tiny-llama" and card.data.license == "mit"
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["qtune", "peft", "lora"]  # unquantized base: no qlora tag
    for text in ("qtune generate alice/tiny", 'PeftModel.from_pretrained(base, "alice/tiny")', "![training loss]"):
        assert text in card.text
    assert "held-out" in card.text.lower() and "loss |" in card.text


def test_push_through_the_xet_pipeline_route(adapter, hub, capsys, monkeypatch):
    # With hf_xet installed (the default), upload_folder takes its pipelined route; this hub stores
    # every file as a regular git blob, which that route commits without xet storage.
    from huggingface_hub.utils import is_package_available

    if not is_package_available("hf_xet"):
        pytest.skip("hf_xet is not installed")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    hub.lfs_patterns = ()
    main(["push", str(adapter), "alice/tiny"])
    assert set(hub.files("alice/tiny")) == UPLOADS | {".gitattributes"}
    assert hub.files("alice/tiny")["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert not hub.calls("PUT") and not hub.calls("POST", "/info/lfs/")


def test_push_again_changes_nothing_and_private_is_private(adapter, hub, capsys, monkeypatch):
    main(["push", str(adapter), "alice/tiny", "--private"])
    first = hub.repo("alice/tiny")
    assert first["private"] is True
    main(["push", str(adapter), "alice/tiny"])
    assert "(main, no change)" in capsys.readouterr().out
    assert hub.repo("alice/tiny")["branches"] == first["branches"]
    assert len(hub.calls("POST", "/commit/")) == 1 and len(hub.calls("POST", "/repos/create")) == 1

    monkeypatch.delenv("HF_TOKEN")  # a stranger cannot see a private repo
    line = error_line(capsys, ["generate", "alice/tiny", "--prompt", "hi"])
    assert "has no model repo 'alice/tiny'" in line and "private" in line and "HF_TOKEN" in line


def test_dry_run_writes_the_folder_and_contacts_no_one(adapter, hub, capsys, tmp_path):
    adapter = shutil.copytree(adapter, tmp_path / "adapters" / "tiny")
    main(["push", str(adapter), "alice/tiny", "--dry-run"])
    note, head, *lines = capsys.readouterr().out.splitlines()
    staged = adapter.parent / "tiny.hub"
    assert note.startswith("note: the base is the local folder /") and "pass --base-model OWNER/NAME" in note
    assert head == f"dry run: {staged} holds what `qtune push` would upload to alice/tiny:"
    listed = {line.split()[0]: line.split()[1:] for line in lines}
    assert set(listed) == UPLOADS == {p.name for p in staged.iterdir()} - {".qtune-dry-run"}
    weights = (staged / "adapter_model.safetensors").stat().st_size
    assert listed["adapter_model.safetensors"] == [f"{weights / 1024:.1f}", "KiB"]
    assert hub.requests == []

    main(["push", str(adapter), "alice/tiny", "--dry-run"])  # a previous dry run's folder is replaced
    (staged / "notes.txt").write_text("mine")
    line = error_line(capsys, ["push", str(adapter), "alice/tiny", "--dry-run"])
    assert f"{staged} exists and holds other files than a staged push" in line
    main(["push", str(adapter), "alice/tiny", "--dry-run", "--out", str(tmp_path / "elsewhere")])
    # Neither the adapter folder itself nor another adapter folder is ever taken for a dry run's folder.
    other = shutil.copytree(adapter, tmp_path / "adapters" / "other")
    for out in (adapter, adapter / "sub", other):
        line = error_line(capsys, ["push", str(adapter), "alice/tiny", "--dry-run", "--out", str(out)])
        assert "choose another" in line or "was not written by `qtune push --dry-run`" in line, line
    assert (adapter / "adapter_model.safetensors").is_file() and (other / "adapter_model.safetensors").is_file()

    # The dry run's folder is byte for byte what a push uploads.
    main(["push", str(adapter), "alice/tiny"])
    uploaded = hub.files("alice/tiny")
    for name in UPLOADS:
        assert uploaded[name] == (tmp_path / "elsewhere" / name).read_bytes(), name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{adapter}", "not a repo"], "'not a repo' is not a hub repo id: write it as 'owner/name'"),
        (["{adapter}", "alice/bad name"], "'alice/bad name' is not a valid hub repo id"),
        (["{adapter}", "alice"], "'alice' is not a hub repo id"),
        (["{missing}", "alice/tiny"], "adapter_model.safetensors is missing"),
        (["{adapter}", "alice/tiny", "--revision", "dev"], "alice/tiny on http://127.0.0.1:"),
        (["{adapter}", "alice/tiny@dev", "--revision", "v2"], "two revisions given"),
        (["{adapter}", "alice/tiny", "--out", "x"], "--out names the folder a --dry-run writes"),
    ],
)
def test_bad_input_fails_before_any_upload(adapter, hub, capsys, tmp_path, argv, message):
    missing = shutil.copytree(adapter, tmp_path / "incomplete")
    (missing / "adapter_model.safetensors").unlink()
    argv = [a.format(adapter=adapter, missing=missing) for a in argv]
    line = error_line(capsys, ["push", *argv])
    assert message in line
    if "--revision" in argv and "@" not in argv[1]:
        assert "has no branch 'dev'" in line and "nothing was uploaded" in line
        assert [f"{r.method} {r.path}" for r in hub.requests] == ["GET /api/models/alice/tiny/refs"]
    else:
        assert hub.requests == []


def test_missing_token_and_unknown_branch_of_an_existing_repo(adapter, hub, capsys, monkeypatch):
    main(["push", str(adapter), "alice/tiny"])
    before = len(uploads(hub))
    line = error_line(capsys, ["push", str(adapter), "alice/tiny", "--revision", "dev"])
    assert "alice/tiny on" in line and "has no branch 'dev' (it has: main)" in line
    assert "hf repos branch create alice/tiny dev" in line
    line = error_line(capsys, ["push", str(adapter), "bob/tiny"])  # alice's token, bob's namespace
    assert "The token cannot write to bob: use a token with write access there" in line
    assert hub.repo("bob/tiny") is None and uploads(hub)[before:] == ["POST /api/repos/create"]  # refused
    before = len(uploads(hub))
    monkeypatch.delenv("HF_TOKEN")
    line = error_line(capsys, ["push", str(adapter), "alice/tiny"])
    assert line == "error: no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)"
    assert len(uploads(hub)) == before
    go_offline(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert "HF_HUB_OFFLINE is set: pushing needs the network" in error_line(capsys, ["push", str(adapter), "alice/x"])


def test_push_to_an_existing_branch_and_load_it_by_revision(adapter, hub, capsys, tmp_path):
    main(["push", str(adapter), "alice/tiny"])
    hub.create_branch("alice/tiny", "dev")
    main_commit = hub.repo("alice/tiny")["branches"]["main"]
    main(["push", str(adapter), "alice/tiny", "--revision", "dev", "--license", "mit"])
    assert "(dev, commit " in capsys.readouterr().out
    branches = hub.repo("alice/tiny")["branches"]
    assert branches["main"] == main_commit and branches["dev"] != main_commit
    assert b"license: mit" in hub.files("alice/tiny", "dev")["README.md"]
    assert b"license: mit" not in hub.files("alice/tiny", "main")["README.md"]
    folder = qhub.resolve_adapter("alice/tiny@dev")
    assert folder.name == branches["dev"] and b"license: mit" in (folder / "README.md").read_bytes()


def test_corrupt_weights_are_refused(adapter, hub, tmp_path):
    broken = shutil.copytree(adapter, tmp_path / "broken")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(qhub.HubError, match="is corrupt or incomplete"):
        qhub.push(broken, "alice/tiny")
    assert hub.requests == []


def test_an_interrupted_push_completes_when_run_again(adapter, hub, capsys):
    hub.fail_commits = 1  # the LFS uploads land, then the commit fails: what a dropped push leaves
    line = error_line(capsys, ["push", str(adapter), "alice/tiny"])
    assert line.startswith(f"error: pushing {adapter} to alice/tiny failed: HfHubHTTPError: Server error '500")
    assert "(Internal Error: the commit was interrupted)" in line and "run the same command again" in line
    assert set(hub.files("alice/tiny")) == {".gitattributes"}  # nothing committed
    puts = len(hub.calls("PUT"))
    assert puts == 2

    main(["push", str(adapter), "alice/tiny"])
    assert len(hub.calls("PUT")) == puts  # the hub already had the LFS objects: not sent again
    files = hub.files("alice/tiny")
    assert set(files) == UPLOADS | {".gitattributes"}
    assert files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()


# ---------------------------------------------------------------- load by id


def test_load_by_id_then_offline_from_the_cache(adapter, hub, capsys, monkeypatch, tmp_path):
    main(["push", str(adapter), "alice/tiny"])
    capsys.readouterr()
    main(["generate", str(adapter), "--prompt", "the movie was great", "--max-new-tokens", "4"])
    expected = capsys.readouterr().out
    hub.requests.clear()

    main(["generate", "alice/tiny", "--prompt", "the movie was great", "--max-new-tokens", "4"])
    assert capsys.readouterr().out == expected
    fetched = sorted(r.path.rsplit("/", 1)[1] for r in hub.calls("GET", "/resolve/"))
    assert fetched == ["README.md", "adapter_config.json", "adapter_model.safetensors", "qtune.json"]  # no PNGs
    cached = tmp_path / "hf-home" / "hub" / "models--alice--tiny"
    assert (cached / "refs" / "main").read_text() == hub.repo("alice/tiny")["branches"]["main"]

    main(["eval", "alice/tiny@main", "--data", str(adapter.parent.parent / "train.jsonl"), "--limit", "2"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["adapter"] == "alice/tiny@main"
    main(["export", "alice/tiny", "--format", "peft", str(tmp_path / "serve")])
    assert (tmp_path / "serve" / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    capsys.readouterr()

    hub.stop()  # offline: from the cache alone, with no server at all
    go_offline(monkeypatch)
    main(["generate", "alice/tiny", "--prompt", "the movie was great", "--max-new-tokens", "4"])
    assert capsys.readouterr().out == expected
    line = error_line(capsys, ["generate", "alice/other", "--prompt", "hi"])
    assert "alice/other: no such adapter folder; HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" in line


def test_load_by_id_errors(adapter, hub, capsys, monkeypatch, tmp_path):
    main(["push", str(adapter), "alice/tiny"])
    line = error_line(capsys, ["generate", "alice/nothing", "--prompt", "hi"])
    assert line == f"error: alice/nothing: no such adapter folder, and {hub.url} has no model repo 'alice/nothing' " + (
        "(if it is private, set HF_TOKEN or run `hf auth login`)"
    )
    line = error_line(capsys, ["generate", "alice/tiny@v9", "--prompt", "hi"])
    assert "alice/tiny@v9: no such adapter folder, and the hub repo alice/tiny" in line and "no revision 'v9'" in line
    assert "'alice/bad name' is not a valid hub repo id" in error_line(capsys, ["merge", "alice/bad name", "out"])

    # A plain PEFT repo (no qtune.json): refused by the verbs, which need the base recorded there;
    # taken by callers that load plain PEFT adapters themselves (require_meta=False).
    from huggingface_hub import HfApi

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(adapter / name, plain / name)
    api = HfApi(endpoint=hub.url, token=SECRET)
    api.create_repo("alice/plain")
    api.upload_folder(repo_id="alice/plain", folder_path=plain)
    line = error_line(capsys, ["export", "alice/plain", "--format", "peft", str(tmp_path / "x")])
    assert "hub repo alice/plain is not a qtune adapter (no qtune.json)" in line
    folder = qhub.resolve_adapter("alice/plain", require_meta=False)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    # A local path always wins over a hub id of the same spelling, and `folder/typo` under an existing
    # folder is a local typo, never a download.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(adapter, tmp_path / "alice" / "tiny")
    assert qhub.resolve_adapter("alice/tiny") == Path("alice/tiny")
    hub.requests.clear()
    assert "alice/typo: no such adapter folder" in error_line(capsys, ["generate", "alice/typo", "--prompt", "x"])
    assert hub.requests == []


CHATS = [
    {"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]} for i in range(3)
]


def test_hub_dataset_id_online_then_offline_from_the_datasets_cache(hub, chatml_tokenizer, monkeypatch, tmp_path):
    import datasets
    from huggingface_hub import HfApi

    from qtune.config import DataConfig
    from qtune.data import load_examples
    from qtune.errors import DataError

    # datasets, like huggingface_hub, reads the endpoint, its cache and the offline switch once, at import. It
    # calls hf_hub_download without a cache_dir (the hub cache: a constant) and hf_hub_url without an endpoint
    # (the URL template: a constant). Off: its download counter (a HEAD to S3) and the dataset viewer (a
    # separate service, datasets-server.<host>).
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.url)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-home" / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    monkeypatch.setattr(datasets.config, "USE_PARQUET_EXPORT", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.chdir(tmp_path)  # no ./alice folder: `alice/chats` is a hub id

    api = HfApi(endpoint=hub.url, token=SECRET)
    api.create_repo("alice/chats", repo_type="dataset")
    api.upload_file(
        path_or_fileobj="".join(json.dumps(r) + "\n" for r in CHATS).encode(),
        path_in_repo="train.jsonl",
        repo_id="alice/chats",
        repo_type="dataset",
    )
    assert hub.repo("alice/chats") is None  # a dataset, not a model of the same name
    assert set(hub.files("alice/chats", repo_type="dataset")) == {".gitattributes", "train.jsonl"}
    hub.requests.clear()

    examples, report = load_examples("alice/chats:train", chatml_tokenizer, DataConfig())
    assert (report.format, report.records, len(examples)) == ("sharegpt", 3, 3)
    texts = [chatml_tokenizer.decode(e.input_ids) for e in examples]
    assert all(f"hi {i}" in t and f"hello {i}" in t for i, t in enumerate(texts)), texts
    sha = hub.repo("alice/chats", repo_type="dataset")["branches"]["main"]
    assert [r.path for r in hub.calls("GET", "/resolve/")] == [f"/datasets/alice/chats/resolve/{sha}/train.jsonl"]
    assert not hub.calls(contains="/api/models/")
    online = [(e.input_ids, e.labels) for e in examples]

    hub.stop()  # offline: from the datasets cache alone, with no server at all
    go_offline(monkeypatch)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    examples, report = load_examples("alice/chats:train", chatml_tokenizer, DataConfig())
    assert (report.format, report.records) == ("sharegpt", 3)
    assert [(e.input_ids, e.labels) for e in examples] == online
    with pytest.raises(DataError, match="alice/other: no such file, and as a hub dataset .*HF_HUB_OFFLINE is set"):
        load_examples("alice/other", chatml_tokenizer, DataConfig())


def test_resolve_adapter_without_a_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").mkdir()
    assert qhub.resolve_adapter(str(tmp_path)) == tmp_path
    assert qhub.resolve_adapter("adapters/none") == Path("adapters/none")  # local: `./adapters` exists
    with pytest.raises(AdapterError, match="someone/thing: no such adapter folder; HF_HUB_OFFLINE is set"):
        qhub.resolve_adapter("someone/thing")
    assert qhub.parse_repo_id("a/b@dev") == ("a/b", "dev") and qhub.parse_repo_id("a/b") == ("a/b", None)
    with pytest.raises(qhub.HubError, match="nothing after '@'"):
        qhub.parse_repo_id("a/b@")


# ---------------------------------------------------------------- the model card


def _meta(**over):
    meta = {
        "kind": "causal-lm",
        "base": {"name": "smollm2-135m", "path": "/home/alice/.cache/qtune/models/x", "fingerprint": "sha256:ab"},
        "config": {
            "model": {"name": "smollm2-135m", "dtype": "bf16"},
            "quant": {"method": "nf4", "double_quant": True},
            "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0, "targets": "all-linear"},
            "train": {"batch_size": 8, "grad_accum": 1, "lr": 2e-4, "scheduler": "cosine"},
            "data": {"train": "/home/alice/data/reviews.jsonl", "eval": None},
            "output": {"dir": "/home/alice/adapters", "name": "sent"},
        },
        "data": {"train": {"file": "/home/alice/data/reviews.jsonl", "records": 400}, "eval": None},
        "training": {"steps": 100, "seconds": 61.5, "train_loss": 0.4},
        "metrics": {"held-out_accuracy": 0.91},
        "versions": {"qtune": "0.1.0"},
        "hardware": {"gpu": "RTX 3060 12GB"},
    }
    return {**meta, **over}


def test_model_card_front_matter_and_body():
    card = ModelCard(qhub.render_card(_meta(), "alice/sent", files=["loss.png"], datasets=["stanfordnlp/imdb"]))
    assert card.data.to_dict() == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "datasets": ["stanfordnlp/imdb"],
        "library_name": "peft",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["qtune", "peft", "lora", "qlora"],
    }
    for text in (
        "# sent",
        "4-bit nf4 base (QLoRA)",
        "Q4_1 GGUF",
        "| LoRA | r=16, alpha=32.0, dropout=0.0 |",
        "| hardware | gpu: RTX 3060 12GB |",
        "| training time | 61.5 s |",
        "| held-out_accuracy | 0.91 |",
        "`reviews.jsonl`: 400 records",
        "quantization_config=BitsAndBytesConfig",
    ):
        assert text in card.text, text
    assert "/home/alice" not in str(card)  # local paths are cut in the card's config and data too

    labels = {"id2label": {"0": "neg", "1": "pos"}}
    cls = _meta(kind="sequence-classification", labels=labels)
    cls["config"] = {**cls["config"], "model": {"name": "/models/my-bert"}, "quant": {"method": "none"}}
    card = ModelCard(qhub.render_card(cls, "alice/cls", files=["confusion.png"]))
    assert card.data.pipeline_tag == "text-classification" and card.data.base_model is None
    assert card.data.tags == ["qtune", "peft", "lora"] and card.data.license is None
    assert "qtune predict alice/cls" in card.text and "num_labels=2" in card.text
    assert "![confusion matrix](confusion.png)" in card.text and "The base was a local folder" in card.text


def test_classification_adapter_stages_its_confusion_matrix(adapter, tmp_path):
    cls = shutil.copytree(adapter, tmp_path / "cls")
    (cls / "confusion.png").write_bytes(b"\x89PNG fake")
    (cls / "tokenizer.json").write_text("{}")
    (cls / "notes.txt").write_text("private notes")
    result = qhub.push(cls, "alice/cls", dry_run=True)
    assert {name for name, _ in result.files} == UPLOADS | {"confusion.png", "tokenizer.json"}


# ---------------------------------------------------------------- the token


def test_the_token_is_never_printed_logged_or_written(adapter, hub, capsys, caplog, monkeypatch, tmp_path, request):
    caplog.set_level(logging.DEBUG)
    hf_logger = logging.getLogger("huggingface_hub")  # it may not propagate to the root logger
    monkeypatch.setattr(hf_logger, "level", logging.DEBUG)
    hf_logger.addHandler(caplog.handler)
    request.addfinalizer(lambda: hf_logger.removeHandler(caplog.handler))
    main(["push", str(adapter), "alice/tiny", "--dry-run", "--out", str(tmp_path / "dry")])
    error_line(capsys, ["push", str(adapter), "alice/tiny", "--revision", "nope"])
    hub.fail_commits = 1
    error_line(capsys, ["push", str(adapter), "alice/tiny"])
    main(["push", str(adapter), "alice/tiny", "--private"])
    main(["generate", "alice/tiny", "--prompt", "hi", "--max-new-tokens", "2"])
    monkeypatch.setenv("HF_TOKEN", SECRET + "x")  # a wrong token: the server's 401 must not echo it either
    assert "The hub refused the token: check HF_TOKEN" in error_line(capsys, ["push", str(adapter), "alice/tiny2"])
    monkeypatch.setenv("HF_TOKEN", SECRET)

    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    written += [p for p in adapter.parent.rglob("*") if p.is_file()]
    assert any("models--alice--tiny" in str(p) for p in written) and any("hub-storage" in str(p) for p in written)
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []
    authorized = 0
    for r in hub.requests:
        assert SECRET not in r.path + r.query and SECRET.encode() not in r.body
        for name, value in r.headers.items():
            if name == "authorization":
                authorized += value in (f"Bearer {SECRET}", f"Bearer {SECRET}x")
            else:
                assert SECRET not in value, name
    assert authorized > 10
    assert all("authorization" not in r.headers for r in hub.calls("PUT"))  # LFS uploads go without it
