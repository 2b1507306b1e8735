"""Publish an adapter folder to the Hugging Face Hub (`qtune push`).

What is uploaded is staged first, in a folder of its own: the PEFT files, qtune.json, the PNGs, the
tokenizer files if the adapter has them, and a model card (README.md). `--dry-run` writes that folder
and stops; a push uploads exactly it with huggingface_hub's `upload_folder`.

Settings come from the environment at call time, as huggingface_hub names them: HF_ENDPOINT,
HF_HUB_OFFLINE, HF_HUB_CACHE / HF_HOME, and the token (HF_TOKEN, else the stored `hf auth login`).
The token goes to huggingface_hub and nowhere else: qtune never prints, logs or writes it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qtune.errors import AdapterError
from qtune.hub.card import base_hub_id, public_meta, render_card
from qtune.hub.resolve import CARD_FILE, HubError, brief_error, hub_endpoint, hub_offline, parse_repo_id
from qtune.lora import check_weights
from qtune.meta import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_FILE, AdapterMeta, read_meta

# The adapter files a push uploads (when present), besides the model card.
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, META_FILE, "loss.png", "confusion.png")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
STAGED_FILES = (*ADAPTER_FILES, *TOKENIZER_FILES, CARD_FILE)


@dataclass
class PushResult:
    """What `push` staged and, unless a dry run, where it went."""

    folder: Path  # the staged folder (a temporary one, already removed, after a real push)
    files: list[tuple[str, int]]  # (name, size in bytes) of every staged file
    url: str | None = None  # the repo's page
    commit: str | None = None  # the commit the push created (None when nothing had changed)
    notes: list[str] = field(default_factory=list)  # things the user should know (printed as `note:`)


def _read_checked(adapter_dir: Path) -> dict:
    """qtune.json as written, after refusing what no verb could load back: a missing or incomplete folder, a
    qtune.json that does not parse, an adapter_config.json that is not a JSON object (an AdapterError naming the
    file), a corrupt adapter_model.safetensors (a HubError). Nothing is staged or uploaded from such a folder."""
    meta = read_meta(adapter_dir)  # adapter_config.json too
    AdapterMeta.from_json(meta, str(adapter_dir / META_FILE))  # what every verb that loads it will parse
    try:
        check_weights(adapter_dir)
    except AdapterError as e:
        raise HubError(str(e)) from None
    return meta


def stage(
    adapter_dir: str | Path,
    out: str | Path,
    repo_id: str,
    *,
    license: str | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
    meta: dict | None = None,
) -> list[tuple[str, int]]:
    """Write into the empty folder `out` exactly what a push uploads; returns (name, size) of each file.

    qtune.json is published with local paths cut (`public_meta`) and, with `base_model`, that hub id as
    the base's `model.name`; adapter_config.json with
    `base_model_name_or_path` set to the base's hub id when known, so PEFT's AutoPeftModel finds it.
    """
    adapter_dir, out = Path(adapter_dir), Path(out)
    meta = meta if meta is not None else _read_checked(adapter_dir)  # `meta`: the caller read and checked it
    names = [n for n in ADAPTER_FILES + TOKENIZER_FILES if (adapter_dir / n).is_file()]
    for name in names:
        if name not in (META_FILE, ADAPTER_CONFIG):
            shutil.copyfile(adapter_dir / name, out / name)
    published = public_meta(meta)
    if base_model:  # the hub copy of a local base: loads by id anywhere, the fingerprint still checked
        published["config"]["model"]["name"] = published["base"]["name"] = base_model
    (out / META_FILE).write_text(json.dumps(published, indent=2) + "\n")
    peft_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = base_model or base_hub_id(meta)
    if base:
        peft_config["base_model_name_or_path"] = base
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    card = render_card(meta, repo_id, files=names, license=license, datasets=datasets, base_model=base_model)
    (out / CARD_FILE).write_text(card)
    return [(name, (out / name).stat().st_size) for name in sorted([*names, CARD_FILE])]


def default_dry_run_dir(adapter_dir: str | Path) -> Path:
    """Where `--dry-run` writes by default: `<adapter>.hub/` beside the adapter folder."""
    adapter_dir = Path(adapter_dir)
    return adapter_dir.parent / f"{adapter_dir.name}.hub"


DRY_RUN_MARKER = ".qtune-dry-run"  # marks a folder `--dry-run` wrote, the only kind it replaces


def _prepare_out(out: Path, adapter_dir: Path) -> None:
    """An empty `out`; a previous dry run's folder (marked, staged files only) is replaced, anything else refused.

    An adapter folder holds files with the same names as a staged push: without the marker it is
    never taken for a dry run's folder, and `out` may not be the adapter folder, inside it or around it.
    """
    here, adapter = out.resolve(), adapter_dir.resolve()
    if here == adapter or adapter in here.parents or here in adapter.parents:
        raise HubError(f"--out {out} is the adapter folder {adapter_dir}, inside it or around it: choose another")
    if out.exists():
        names = {p.name for p in out.iterdir()} if out.is_dir() else set()
        if (
            not out.is_dir()
            or DRY_RUN_MARKER not in names
            or any(p.name not in {*STAGED_FILES, DRY_RUN_MARKER} or p.is_dir() for p in out.iterdir())
        ):
            raise HubError(
                f"{out} exists and holds other files than a staged push (or was not written by `qtune push "
                "--dry-run`): remove it or pass --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)


def push(
    adapter_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    out: str | Path | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Upload an adapter folder to the hub repo `repo_id` (created if needed), or stage it only (`dry_run`).

    Everything that can be checked locally is checked before any request: the repo id, the adapter
    folder and its weights, the token. Then the repo and the revision are checked before any upload.
    An interrupted push is completed by running it again: files the hub already holds are not resent.
    """
    adapter_dir = Path(adapter_dir)
    if out is not None and not dry_run:
        raise HubError("--out names the folder a --dry-run writes; a push stages in a temporary folder")
    repo_id, at_revision = parse_repo_id(repo_id)
    if at_revision and revision and at_revision != revision:
        raise HubError(f"two revisions given: '@{at_revision}' in the repo id and --revision {revision}")
    revision = revision or at_revision
    meta = _read_checked(adapter_dir)
    if base_model is not None:
        parse_repo_id(base_model)
    notes = []
    if base_model is None and base_hub_id(meta) is None:
        notes.append(
            f"the base is the local folder {meta.get('config', {}).get('model', {}).get('name')}: the adapter loads "
            "back only where "
            "that folder exists, and the card names no base_model (pass --base-model OWNER/NAME if it is a hub model)"
        )

    if dry_run:
        folder = Path(out) if out is not None else default_dry_run_dir(adapter_dir)
        _prepare_out(folder, Path(adapter_dir))
        files = stage(
            adapter_dir, folder, repo_id, license=license, datasets=datasets, base_model=base_model, meta=meta
        )
        (folder / DRY_RUN_MARKER).write_text("written by `qtune push --dry-run`; not uploaded\n")
        return PushResult(folder, files, notes=notes)

    from huggingface_hub import get_token

    if hub_offline():
        raise HubError("HF_HUB_OFFLINE is set: pushing needs the network (unset it, or use --dry-run)")
    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    with tempfile.TemporaryDirectory(prefix="qtune-push-") as tmp:
        folder = Path(tmp) / repo_id.split("/")[1]
        folder.mkdir()
        files = stage(
            adapter_dir, folder, repo_id, license=license, datasets=datasets, base_model=base_model, meta=meta
        )
        try:
            url, commit = _upload(
                folder, repo_id, token, private, revision, commit_message or f"qtune push {adapter_dir.name}"
            )
        except HubError:
            raise
        except Exception as e:
            raise HubError(_push_failure(e, adapter_dir, repo_id).replace(token, "***")) from None
    return PushResult(folder, files, url, commit, notes)


def _push_failure(error: Exception, adapter_dir: Path, repo_id: str) -> str:
    """One line on why a push failed and what to do; the token is never part of it."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    said = getattr(error, "server_message", None)
    reason = brief_error(error) + (f" ({said.strip()})" if said and said.strip() else "")
    head = f"pushing {adapter_dir} to {repo_id} failed: {reason}"
    if status == 401:
        return f"{head}. The hub refused the token: check HF_TOKEN, or run `hf auth login` again"
    if status == 403:
        return f"{head}. The token cannot write to {repo_id.split('/')[0]}: use a token with write access there"
    return (
        f"{head}. Nothing is lost: run the same command again to finish it "
        "(files the hub already has are not sent twice)"
    )


def _upload(folder: Path, repo_id: str, token: str, private: bool, revision: str | None, message: str):
    """Create the repo if needed, check the branch, upload `folder`; returns (repo url, commit id)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=hub_endpoint(), token=token)
    where = api.endpoint
    try:
        branches = {b.name: b.target_commit for b in api.list_repo_refs(repo_id).branches}
    except RepositoryNotFoundError:
        branches = None
    if revision not in (None, "main") and revision not in (branches or {}):
        exists = "" if branches is None else f" (it has: {', '.join(branches)})"
        raise HubError(
            f"{repo_id} on {where} has no branch {revision!r}{exists}: create it first "
            f"(`hf repos branch create {repo_id} {revision}`), or push to main; nothing was uploaded"
        )
    if branches is None:
        api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message)
    before = (branches or {}).get(revision or "main")
    return f"{where}/{repo_id}", None if info.oid == before else info.oid  # the same commit: nothing changed


def format_files(files: list[tuple[str, int]]) -> str:
    """The staged files, one per line, with their sizes."""
    width = max(len(name) for name, _ in files)
    return "\n".join(f"  {name:<{width}}  {_size(size):>9}" for name, size in files)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
