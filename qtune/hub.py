"""Publish an adapter folder to the Hugging Face Hub (`qtune push`), and load adapters back by hub id.

What is uploaded is staged first, in a folder of its own: the PEFT files, qtune.json, the PNGs, the
tokenizer files if the adapter has them, and a model card (README.md). `--dry-run` writes that folder
and stops; a push uploads exactly it with huggingface_hub's `upload_folder`.

Settings come from the environment at call time, as huggingface_hub names them: HF_ENDPOINT,
HF_HUB_OFFLINE, HF_HUB_CACHE / HF_HOME, and the token (HF_TOKEN, else the stored `hf auth login`).
The token goes to huggingface_hub and nowhere else: qtune never prints, logs or writes it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtune.errors import AdapterError
from qtune.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_FILE, check_weights, read_meta
from qtune.models import EMBEDDED_ALIAS, ENCODER_ALIAS

CARD_FILE = "README.md"
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
# What a load by id downloads: the adapter, its metadata and card; never the PNGs.
DOWNLOAD_PATTERNS = [ADAPTER_WEIGHTS, "*.json", CARD_FILE]

# The hub repos of qtune's embedded bases, and their licenses.
BASE_IDS = {
    EMBEDDED_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct",
    ENCODER_ALIAS: "sentence-transformers/all-MiniLM-L6-v2",
}
BASE_LICENSES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0",
}
PIPELINE_TAGS = {"causal-lm": "text-generation", "sequence-classification": "text-classification"}


class HubError(AdapterError):
    """A push or a load by hub id was refused or failed; the message says what to do."""


@dataclass
class PushResult:
    """What `push` staged and, unless a dry run, where it went."""

    folder: Path  # the staged folder (a temporary one, already removed, after a real push)
    files: list[tuple[str, int]]  # (name, size in bytes) of every staged file
    url: str | None = None  # the repo's page
    commit: str | None = None  # the commit the push created (None when nothing had changed)
    notes: list[str] = field(default_factory=list)  # things the user should know (printed as `note:`)


# ---------------------------------------------------------------- settings and ids


def hub_endpoint() -> str | None:
    """HF_ENDPOINT as set now (None: huggingface_hub's default, huggingface.co)."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip()
    return endpoint.rstrip("/") or None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now; huggingface_hub itself reads it once, when imported."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> str | None:
    """HF_HUB_CACHE, else $HF_HOME/hub, as set now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def parse_repo_id(spec: str) -> tuple[str, str | None]:
    """'owner/name' or 'owner/name@revision' -> (repo id, revision or None); a HubError if malformed."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1:
        raise HubError(f"{spec!r} is not a hub repo id: write it as 'owner/name' (e.g. 'alice/smollm2-sentiment')")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(
            f"{repo_id!r} is not a valid hub repo id: owner and name use letters, digits, '-', '_' and '.', "
            "do not start or end with '-' or '.', and the id is at most 96 characters"
        ) from None
    if "@" in spec and not revision:
        raise HubError(f"{spec!r}: nothing after '@'; write 'owner/name@revision' or drop the '@'")
    return repo_id, revision or None


def _looks_local(spec: str) -> bool:
    """A spec that names a local path, not a hub id: explicit paths, and paths under an existing folder."""
    if spec.startswith((".", "/", "~")) or os.sep != "/" and os.sep in spec:
        return True
    first = spec.split("/", 1)[0]
    return "/" in spec and Path(first).is_dir()  # `adapters/typo` with ./adapters present is a local typo


def resolve_adapter(spec: str | Path, *, require_meta: bool = True) -> Path:
    """The local folder of an adapter named by a path or by a hub id ('owner/name[@revision]').

    A path that exists is returned as is (the verbs check its contents). Otherwise a hub id is
    downloaded into the Hugging Face cache (snapshot_download, only the adapter files) from
    HF_ENDPOINT, or taken from the cache alone when HF_HUB_OFFLINE is set. A downloaded repo must be
    a qtune adapter (qtune.json) unless `require_meta` is off (plain PEFT adapters, e.g. for serving).
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists() or _looks_local(spec) or "/" not in spec:
        return path
    repo_id, revision = parse_repo_id(spec)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = hub_endpoint() or "https://huggingface.co"
    missing = f"{spec}: no such adapter folder"
    offline = hub_offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            endpoint=hub_endpoint(),
            cache_dir=hub_cache_dir(),
            allow_patterns=DOWNLOAD_PATTERNS,
            local_files_only=offline,
        )
    except RevisionNotFoundError:
        raise HubError(f"{missing}, and the hub repo {repo_id} ({where}) has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{missing}, and {where} has no model repo {repo_id!r} (if it is private, set HF_TOKEN "
            "or run `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        why = (
            "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache: unset HF_HUB_OFFLINE to download it"
            if offline
            else f"as a hub id it could not be downloaded from {where} and is not cached: check the network"
        )
        raise HubError(f"{missing}; {why}") from None
    except Exception as e:  # connection refused, a server error, a full disk: one clear line
        raise HubError(f"{missing}, and downloading hub repo {repo_id} from {where} failed: {_brief(e)}") from None
    folder = Path(folder)
    if require_meta and not (folder / META_FILE).is_file():
        raise HubError(
            f"hub repo {repo_id} is not a qtune adapter (no {META_FILE}); load plain PEFT adapters with "
            "`PeftModel.from_pretrained`"
        )
    return folder


def _brief(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------- the model card


def base_hub_id(meta: dict[str, Any]) -> str | None:
    """The hub id of the adapter's base: the embedded aliases' repos, a hub id itself, None for a local folder."""
    name = str(meta.get("config", {}).get("model", {}).get("name") or meta.get("base", {}).get("name") or "")
    if name in BASE_IDS:
        return BASE_IDS[name]
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).expanduser().is_dir():
        return None
    return name


def public_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """qtune.json as published: local absolute paths cut to their last part (they name users and folders),
    and no `samples` (held-out prompts with answers: rows of the user's data, which is never uploaded).

    The base's `config.model.name` is kept whatever it is: it is what a load by id resolves the base from.
    """
    meta = json.loads(json.dumps(meta, default=str))
    if meta.get("samples"):
        meta["samples"] = []

    def cut(section: dict[str, Any] | None, key: str) -> None:  # absolute or relative: only the last part
        if isinstance(section, dict) and isinstance(section.get(key), str) and section[key]:
            section[key] = Path(section[key]).name

    cut(meta.get("base"), "path")
    config = meta.get("config", {})
    cut(config.get("data"), "train")
    cut(config.get("data"), "eval")
    cut(config.get("output"), "dir")
    cut(config, "resume")
    for report in (meta.get("data") or {}).values():
        cut(report, "file")
    return meta


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {_fmt(v)} |\n" for k, v in rows)


def render_card(
    meta: dict[str, Any],
    repo_id: str,
    *,
    files: list[str],
    license: str | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
) -> str:
    """The model card (README.md) of an adapter: Hub front matter, then training, data, metrics, usage.

    `base_model` overrides the base's hub id (for a base trained from a local folder).
    """
    import yaml
    from huggingface_hub import ModelCardData

    meta = public_meta(meta)
    cfg = meta.get("config", {})
    kind = meta.get("kind", "causal-lm")
    base = base_model or base_hub_id(meta)
    quant = cfg.get("quant", {}).get("method", "none")
    lora = cfg.get("lora", {})
    train = cfg.get("train", {})
    tags = ["qtune", "peft", "lora", *(["qlora"] if quant in ("nf4", "fp4", "int8") else [])]
    license = license or BASE_LICENSES.get(base or "")
    data = ModelCardData(
        base_model=base,
        library_name="peft",
        pipeline_tag=PIPELINE_TAGS.get(kind),
        tags=tags,
        license=license,
        datasets=datasets or None,
    )
    name = repo_id.split("/")[1]
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{cfg.get('model', {}).get('name')}`"
    quant_text = {"none": "a 16/32-bit base", "int8": "an 8-bit base"}.get(quant, f"a 4-bit {quant} base (QLoRA)")
    lines = [
        f"---\n{data.to_yaml()}\n---\n",
        f"# {name}\n",
        f"A LoRA adapter ({kind}) for {base_text}, trained with qtune on {quant_text}.\n",
    ]
    if cfg.get("model", {}).get("name") == EMBEDDED_ALIAS:
        lines.append(
            "It was trained on the Q4_1 GGUF of SmolLM2-135M-Instruct that qtune embeds (dequantized); "
            "PEFT users who load the original weights get a close, not identical, base.\n"
        )
    elif not base:
        lines.append(
            "The base was a local folder: load the adapter onto the same weights "
            f"(`qtune.json` records their fingerprint, `{meta.get('base', {}).get('fingerprint', '-')}`).\n"
        )

    lines.append(
        "## Use it\n\nWith qtune (the base is loaded as recorded in `qtune.json` and its fingerprint checked):\n"
    )
    if kind == "sequence-classification":
        lines.append(
            f'```bash\nqtune predict {repo_id} --text "a wonderful film"\nqtune eval {repo_id} --data test.jsonl\n```\n'
        )
    else:
        lines.append(
            f'```bash\nqtune generate {repo_id} --prompt "Is this review positive or negative? A wonderful film."\n'
            f"qtune eval {repo_id} --data held_out.jsonl\n```\n"
        )
    auto = "AutoModelForSequenceClassification" if kind == "sequence-classification" else "AutoModelForCausalLM"
    labels = meta.get("labels", {}).get("id2label")
    extra = f", num_labels={len(labels)}" if labels else ""
    lines.append(
        "With PEFT and transformers alone:\n\n```python\n"
        f"from peft import PeftModel\nfrom transformers import AutoTokenizer, {auto}\n\n"
        f'base = {auto}.from_pretrained("{base or "PATH/TO/BASE"}"{extra})\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{base or "PATH/TO/BASE"}")\n```\n'
    )
    if quant != "none":
        lines.append(
            f"To load the base as it was trained, pass `quantization_config=BitsAndBytesConfig(...)` for {quant} "
            "(qtune does this for you).\n"
        )

    training = meta.get("training", {})
    lines.append("## Training\n")
    lines.append(
        _table(
            [
                ("base", base or cfg.get("model", {}).get("name")),
                ("base fingerprint", f"`{meta.get('base', {}).get('fingerprint', '-')}`"),
                ("quantization", quant + (" + double quant" if cfg.get("quant", {}).get("double_quant") else "")),
                ("compute dtype", cfg.get("model", {}).get("dtype")),
                ("LoRA", f"r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}"),
                ("targets", lora.get("targets")),
                ("steps", training.get("steps")),
                ("batch", f"{train.get('batch_size')} x {train.get('grad_accum')} accumulation"),
                ("learning rate", f"{_fmt(train.get('lr'))} ({train.get('scheduler')})"),
                ("training loss", training.get("train_loss")),
                ("training time", f"{_fmt(training.get('seconds'))} s"),
                ("hardware", _hardware(meta.get("hardware"))),
            ]
        )
    )
    if any(name == "loss.png" for name in files):
        lines.append("![training loss](loss.png)\n")

    lines.append("## Data\n")
    reports = []
    for split, report in (meta.get("data") or {}).items():
        if not report:
            continue
        reports.append(
            f"- {split}: `{report.get('file')}`: {report.get('records')} records ({report.get('format')}), "
            f"{report.get('examples')} examples, {report.get('tokens')} tokens ({report.get('trained_tokens')} "
            f"trained), {report.get('truncated', 0)} truncated, fingerprint `{report.get('fingerprint')}`\n"
        )
    if datasets:
        reports.append(f"- hub datasets: {', '.join(datasets)}\n")
    lines.append("".join(reports))

    metrics = {k: v for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
    lines.append("## Metrics (held-out)\n")
    lines.append(_table(sorted(metrics.items())) if metrics else "No held-out data was given (`data.eval`).\n")
    if any(name == "confusion.png" for name in files):
        lines.append("![confusion matrix](confusion.png)\n")

    versions = meta.get("versions", {})
    lines.append("## Versions\n\n" + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
    config_yaml = yaml.safe_dump(cfg, sort_keys=False)
    lines.append(
        "## Configuration\n\nThe resolved config (`qtune.json` holds it with the data report, metrics and versions):"
        f"\n\n<details>\n\n```yaml\n{config_yaml}```\n\n</details>\n"
    )
    return "\n".join(lines)


def _hardware(value: Any) -> str:
    if not value:
        return "not recorded"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    return str(value)


# ---------------------------------------------------------------- staging and pushing


def _check_weights(adapter_dir: Path) -> None:
    """lora.check_weights, as a HubError: nothing is staged or uploaded from a corrupt adapter."""
    try:
        check_weights(adapter_dir)
    except AdapterError as e:
        raise HubError(str(e)) from None


def stage(
    adapter_dir: str | Path,
    out: str | Path,
    repo_id: str,
    *,
    license: str | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
) -> list[tuple[str, int]]:
    """Write into the empty folder `out` exactly what a push uploads; returns (name, size) of each file.

    qtune.json is published with local paths cut (`public_meta`) and, with `base_model`, that hub id as
    the base's `model.name`; adapter_config.json with
    `base_model_name_or_path` set to the base's hub id when known, so PEFT's AutoPeftModel finds it.
    """
    adapter_dir, out = Path(adapter_dir), Path(out)
    meta = read_meta(adapter_dir)
    _check_weights(adapter_dir)
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
    meta = read_meta(adapter_dir)  # a missing or incomplete adapter folder is an AdapterError naming the file
    _check_weights(adapter_dir)
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
        files = stage(adapter_dir, folder, repo_id, license=license, datasets=datasets, base_model=base_model)
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
        files = stage(adapter_dir, folder, repo_id, license=license, datasets=datasets, base_model=base_model)
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
    reason = _brief(error) + (f" ({said.strip()})" if said and said.strip() else "")
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
