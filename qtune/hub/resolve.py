"""Find an adapter by path or by hub id (`owner/name[@revision]`), through the Hugging Face cache.

Every verb that takes an adapter, and the server, go through `resolve_adapter`. Settings come from the
environment at call time, as huggingface_hub names them: HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_CACHE / HF_HOME.
"""

from __future__ import annotations

import os
from pathlib import Path

from qtune.errors import AdapterError
from qtune.meta import ADAPTER_WEIGHTS, META_FILE

CARD_FILE = "README.md"
# What a load by id downloads: the adapter, its metadata and card; never the PNGs.
DOWNLOAD_PATTERNS = [ADAPTER_WEIGHTS, "*.json", CARD_FILE]


class HubError(AdapterError):
    """A push or a load by hub id was refused or failed; the message says what to do."""


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
        raise HubError(f"{missing}, and downloading hub repo {repo_id} from {where} failed: {brief_error(e)}") from None
    folder = Path(folder)
    if require_meta and not (folder / META_FILE).is_file():
        raise HubError(
            f"hub repo {repo_id} is not a qtune adapter (no {META_FILE}); load plain PEFT adapters with "
            "`PeftModel.from_pretrained`"
        )
    return folder


def brief_error(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
