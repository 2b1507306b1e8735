"""`qtune new`: a commented training config for a base and a data file, sized by `qtune.plan` to a GPU.

    qtune new --base llama-3.1-8b --data my.jsonl --vram 12GB -o my.yaml

The data's first records give its format (`qtune.data.detect_format`) and a length estimate from
characters; the base's architecture comes from `qtune.plan.load_arch` (built in, a folder's
config.json, or a hub id's cached config.json). Settings are tried from the fastest to the most
frugal until the planner says the run fits (`qtune.plan.fit_to_vram` picks micro-batch,
accumulation and checkpointing for each); only then is the sequence cut. There is no memory
model here: every number is the planner's. Without `--vram` the local GPU's memory is used, and
without a GPU the config is a CPU one (fp32, no quantization: what runs fast on a CPU).

The YAML carries each key's help text from qtune/config/schema.py as its comment, plus why
qtune new chose the value where it chose one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtune.errors import ConfigError, DataError, PlanError
from qtune.plan import GIB, Plan, PlanInput, estimate, fit_to_vram, frugal, load_arch, parse_bytes

SAMPLE = 500  # records read for the format and the length estimate
COUNTED = 20_000  # records counted at most (more: treated as a large data set)
CHARS_PER_TOKEN = 3.0  # conservative: Llama-3, Qwen and Gemma tokenizers average about 4 on English text
TOKENS_PER_TURN = 8  # the chat template's role header, separators and end-of-turn per message
DEFAULT_SEQ = 2048  # data.max_length without a data file to measure
MIN_SEQ = 256  # the shortest data.max_length qtune new cuts to before saying the GPU is too small
SEQ_STEP = 64  # data.max_length is a multiple of this
PLACEHOLDER = "my_data.jsonl"
EVAL_LIMIT = 200  # held-out examples evaluated at the end of the run
EVALS = 5  # held-out losses while training (train.eval_every), where the schema has that key

# Tried in this order at the data's length; fit_to_vram picks micro-batch, accumulation and checkpointing for
# each. 16-bit LoRA first, but only where it needs no checkpointing: when 16-bit weights leave so little room
# that activations must be recomputed, 4-bit weights and no recomputation (or a larger micro-batch) win.
CANDIDATES = (  # (quant, optimizer, LoRA rank)
    ("none", "adamw", 16),
    ("nf4", "adamw", 16),
    ("nf4", "paged_adamw8bit", 16),
    ("nf4", "paged_adamw8bit", 8),
)

# The model.name written for a built-in architecture: the instruct (chat) release, whose tokenizer carries the
# chat template that training, generate and serve use. Each is also an alias of qtune.plan's table, so the
# written config plans offline.
HUB_IDS = {
    "llama-2-7b": "meta-llama/Llama-2-7b-chat-hf",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.2",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "gemma-2-9b": "google/gemma-2-9b-it",
    "gemma-3-1b": "google/gemma-3-1b-it",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "smollm2-135m": "smollm2-135m",  # the embedded SmolLM2-135M-Instruct: no download
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}


# --------------------------------------------------------------------------------------------
# The data


@dataclass
class DataSummary:
    """What qtune new read of the data: its format, its size, and its longest record in estimated tokens."""

    path: str | None  # None: no data file (the config gets a placeholder)
    format: str = "auto"
    records: int | None = None  # counted up to COUNTED; None without a file
    more: bool = False  # more than COUNTED records
    longest: int | None = None  # estimated tokens of the longest sampled record
    sampled: int = 0
    invalid: int = 0  # sampled records that are not valid records of the format

    def describe(self) -> str:
        if self.path is None:
            return f"data: none given; data.train is the placeholder {PLACEHOLDER}, data.max_length a default"
        count = f"more than {COUNTED:,}" if self.more else f"{self.records:,}"
        text = (
            f"data: {self.path}: {self.format}, {count} records, longest ~{self.longest:,} tokens "
            f"(estimated from characters over the first {self.sampled:,})"
        )
        if self.invalid:
            text += f"; {self.invalid} of them are not valid {self.format} records (qtune train lists each)"
        return text


def _estimated_tokens(record: dict) -> int:
    """Tokens of a validated record, from its characters: a conservative estimate, no tokenizer needed."""
    if "messages" in record:
        turns = record["messages"]
        chars = sum(len(m.get("content") or "") + len(str(m.get("tool_calls") or "")) for m in turns)
    elif "prompt" in record:
        turns, chars = [0, 0], len(record["prompt"]) + len(record["completion"])
    else:
        turns, chars = [0], len(record["text"])
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_TURN * len(turns) + 2  # + BOS and EOS


def read_data(path: str | Path) -> DataSummary:
    """Detect the format of a data source and estimate its length from its first SAMPLE records.

    Raises:
        DataError: the source cannot be read, holds no records, or its format cannot be told; the message
            names the file.
    """
    from qtune.data.formats import detect_format, validate
    from qtune.data.read import Bad, iter_records

    name = str(path)
    summary = DataSummary(path=name)
    first_bad, errors, lengths = None, [], []
    try:
        for row, record in itertools.islice(iter_records(path), COUNTED + 1):
            summary.records = (summary.records or 0) + 1
            if summary.records > SAMPLE:
                continue  # counted, not read
            if isinstance(record, Bad):
                first_bad = first_bad or f"{name}: row {row}: {record.message}"
                summary.invalid += 1
                continue
            if summary.format == "auto":
                summary.format = detect_format(row, record, name)
            normalized = validate(record, summary.format, row, errors)
            if normalized is None:
                summary.invalid += 1
            else:
                lengths.append(_estimated_tokens(normalized))
    except DataError:
        raise
    except Exception as e:  # a damaged Parquet file, a folder that is not a saved dataset: one line
        why = " ".join(str(e).split())[:200]
        raise DataError(f"{name}: cannot read it as data ({type(e).__name__}: {why})") from None
    if not summary.records:
        raise DataError(f"{name}: holds no records")
    if not lengths:  # not one sampled record is usable: the first problem, on one line
        raise DataError(first_bad or f"{name}: {errors[0]}")
    summary.more = summary.records > COUNTED
    summary.records = min(summary.records, COUNTED)
    summary.sampled = min(summary.records, SAMPLE)
    summary.longest = max(lengths)
    return summary


# --------------------------------------------------------------------------------------------
# The choice


@dataclass
class Choice:
    """Everything qtune new decided, and the planner's verdict on it."""

    base: str  # as the user named it
    model_name: str  # what model.name gets
    data: DataSummary
    plan: Plan  # the chosen run, planned (vram set on a GPU)
    grad_accum: int
    device: str  # "gpu" or "cpu"
    vram_text: str | None  # train.fit_to_vram, e.g. "12GB" (None on a CPU)
    seq_wanted: int  # the data's length (or the default), capped by the model's context
    epochs: float
    eval_fraction: float
    chat_template: str | None = None  # written only when the base has no template of its own
    notes: list[str] = field(default_factory=list)

    @property
    def seq(self) -> int:
        return self.plan.input.seq


def detect_gpu() -> tuple[int, str, bool] | None:
    """The local CUDA GPU's usable memory in bytes, its name, and whether it computes in bf16; None without one.

    The card's total memory, unless other processes hold more than 1 GiB of it: then what is free.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    usable = total if total - free <= GIB else free  # (this process's own CUDA context takes some of `free`)
    return usable, torch.cuda.get_device_name(), torch.cuda.is_bf16_supported()


def _vram_text(vram: int) -> str:
    """A size as train.fit_to_vram writes it, rounded down: 12GB, 139.71GB."""
    return f"{math.floor(vram / GIB * 100) / 100:g}GB"


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _input(seq: int, batch: int, quant: str, optim: str, rank: int, dtype: str, checkpointing: bool) -> PlanInput:
    """The planner's input for these settings and the schema's defaults for the rest: what `qtune train` plans
    (PlanInput.from_config) for the config qtune new writes."""
    from qtune.config import RunConfig

    return PlanInput.from_config(
        RunConfig(),
        seq=seq,
        batch=batch,
        quant=quant,
        double_quant=quant != "none",
        lora_r=rank,
        optim=optim,
        dtype=dtype,
        gradient_checkpointing=checkpointing,
        gpus=1,
        sharding="ddp",
    )


def _fit(arch: dict, seq: int, batch: int, dtype: str, vram: int) -> tuple[PlanInput, int] | None:
    """The first of CANDIDATES that the planner fits in `vram` at `seq` (micro-batch, accumulation, checkpointing
    chosen by fit_to_vram for the effective `batch`), or None."""
    for quant, optim, rank in CANDIDATES:
        inp = _input(seq, batch, quant, optim, rank, dtype, checkpointing=True)
        try:
            chosen, accum = fit_to_vram(arch, inp, vram)
        except PlanError:
            continue
        if quant == "none" and chosen.gradient_checkpointing:
            continue
        return chosen, accum
    return None


def _frugal(arch: dict, seq: int, dtype: str) -> PlanInput:
    """The least memory qtune new tries: the last candidate, micro-batch 1, every layer checkpointed."""
    quant, optim, rank = CANDIDATES[-1]
    return frugal(_input(seq, 1, quant, optim, rank, dtype, checkpointing=True))


def _schedule(data: DataSummary) -> tuple[int, float, float]:
    """Effective batch, epochs and held-out fraction for the data's size (unknown: a mid-size data set)."""
    n = None if data.path is None else (math.inf if data.more else data.records)
    if n is None:
        return 16, 1.0, 0.05
    batch = 8 if n < 200 else 16  # a small file: more, smaller steps
    epochs = 3.0 if n < 1000 else 2.0 if n < 10_000 else 1.0
    # About EVAL_LIMIT held-out records, between 1% and 10% of the data; none of a file too small to spare any.
    fraction = 0.0 if n < 20 else round(min(0.1, max(0.01, EVAL_LIMIT / n)), 3)
    return batch, epochs, fraction


def _has_chat_template(base: str) -> bool | None:
    """Whether a local base folder's tokenizer carries a chat template; None where qtune new cannot tell cheaply."""
    import json

    folder = Path(base).expanduser()
    if not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return bool(config.get("chat_template")) if isinstance(config, dict) else None


def choose(base: str, data: DataSummary, vram: str | None = None) -> Choice:
    """Pick the config's settings for `base` and `data` so that `qtune.plan` says the run fits.

    `vram` ("12GB") plans for that GPU; without it, the local GPU's memory, or a CPU config when there is none.

    Raises:
        PlanError: the base is unknown, `vram` is not a size, or no setting fits it (naming the smallest that does).
    """
    try:
        arch = load_arch(base)
    except PlanError as e:  # the planner names its own flag; here it is --base
        raise PlanError(str(e).replace("--model", "--base", 1)) from None
    model_name = HUB_IDS.get(base.strip().lower(), base)  # a hub id or folder is written as the user gave it
    context = arch.get("max_position_embeddings") or DEFAULT_SEQ
    wanted = DEFAULT_SEQ if data.longest is None else max(SEQ_STEP, _round_up(data.longest, SEQ_STEP))
    seq = min(wanted, context)
    batch, epochs, fraction = _schedule(data)
    notes = []
    if data.longest is not None and wanted > context:
        notes.append(f"the data's longest records (~{wanted} tokens) are beyond {arch['name']}'s context of {context}")

    template = None
    if data.format in ("chat", "sharegpt", "prompt_completion") and _has_chat_template(base) is False:
        template = "chatml"
        notes.append(f"{base} has no chat template of its own: data.chat_template chatml")

    if vram is None:
        gpu = detect_gpu()
        if gpu is None:
            return _cpu_choice(base, model_name, arch, data, seq, batch, epochs, fraction, template, notes)
        size, name, bf16 = gpu
        notes.append(f"GPU: {name}, planning for {size / GIB:.2f} GiB")
        dtype = "bf16" if bf16 else "fp16"
    else:
        size, dtype = parse_bytes(vram), "bf16"

    found = _fit(arch, seq, batch, dtype, size)
    if found is None:  # not at the data's length: the longest sequence the most frugal setting fits
        longest = estimate(arch, dataclasses.replace(_frugal(arch, seq, dtype), vram=size)).max_seq or 0
        cut = longest // SEQ_STEP * SEQ_STEP
        if cut < MIN_SEQ:
            need = math.ceil(estimate(arch, _frugal(arch, MIN_SEQ, dtype)).total / GIB)
            at_seq = math.ceil(estimate(arch, _frugal(arch, seq, dtype)).total / GIB)
            raise PlanError(
                f"--vram {_vram_text(size)} is too small for {arch['name']} at any setting qtune new tries (4-bit, "
                f"paged 8-bit AdamW, LoRA r=8, micro-batch 1, checkpointing): the smallest VRAM that fits is "
                f"{need}GB (at data.max_length {MIN_SEQ}; {at_seq}GB at {seq})"
            )
        need = math.ceil(estimate(arch, _frugal(arch, seq, dtype)).total / GIB)
        notes.append(
            f"data.max_length {cut}, not {seq}: {seq} does not fit {_vram_text(size)} at any setting (it needs "
            f"{need}GB); longer examples are truncated"
        )
        seq = cut
        found = _fit(arch, seq, batch, dtype, size)
    chosen, accum = found
    return Choice(
        base=base,
        model_name=model_name,
        data=data,
        plan=estimate(arch, chosen),
        grad_accum=accum,
        device="gpu",
        vram_text=_vram_text(size),
        seq_wanted=min(wanted, context),
        epochs=epochs,
        eval_fraction=fraction,
        chat_template=template,
        notes=notes,
    )


def _cpu_choice(base, model_name, arch, data, seq, batch, epochs, fraction, template, notes) -> Choice:
    """No GPU: fp32 weights without quantization (4-bit and bf16 kernels are slow on a CPU), checkpointing off
    (the fastest on the 2-core CPU, docs/performance.md) unless the plan takes more than half the RAM."""
    micro = min(batch, 8)
    inp = _input(seq, micro, "none", "adamw", 16, "fp32", checkpointing=False)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if estimate(arch, inp).total > ram / 2:
        inp = dataclasses.replace(inp, gradient_checkpointing=True)
    plan = estimate(arch, inp)
    notes.append(
        "no CUDA GPU here: a CPU config (model.dtype fp32, quant.method none: what runs fast on a CPU); "
        f"planned memory {plan.total / GIB:.2f} GiB of this machine's {ram / GIB:.1f} GiB of RAM"
    )
    if plan.total > ram:
        notes.append(f"{arch['name']} in fp32 does not fit this machine's RAM: train it on a GPU (qtune new --vram)")
    return Choice(
        base=base,
        model_name=model_name,
        data=data,
        plan=plan,
        grad_accum=batch // micro,
        device="cpu",
        vram_text=None,
        seq_wanted=seq,
        epochs=epochs,
        eval_fraction=fraction,
        chat_template=template,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# The YAML


def _scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("\n...\n").strip()


def _entries(choice: Choice, name: str) -> list[tuple[str, Any, str | None]]:
    """(dotted key, value, why qtune new chose it) for every key the config writes, in order."""
    inp = choice.plan.input
    gpu = choice.device == "gpu"
    fits = f"; fits {choice.vram_text}" if gpu else ""
    entries: list[tuple[str, Any, str | None]] = [
        ("recipe", "sft", None),
        ("model.name", choice.model_name, None),
        ("model.dtype", inp.dtype, "fp32: what runs fast on a CPU" if not gpu else None),
        ("quant.method", inp.quant, _why_quant(choice)),
    ]
    if inp.quant != "none":
        entries.append(("quant.double_quant", inp.double_quant, None))
    entries += [
        ("lora.r", inp.lora_r, f"qtune new: {inp.lora_r}, as 16 does not fit" if inp.lora_r < 16 else None),
        ("lora.alpha", 2.0 * inp.lora_r, None),
        ("lora.targets", inp.targets, None),
    ]
    data = choice.data
    if data.path is None:
        entries.append(("data.train", PLACEHOLDER, "CHANGE THIS to your data file, or override it on the command line"))
    else:
        entries.append(("data.train", data.path, None))
    entries.append(("data.format", data.format, "detected by qtune new" if data.path else None))
    if choice.chat_template:
        entries.append(("data.chat_template", choice.chat_template, "the base has no chat template"))
    if choice.seq < choice.seq_wanted:
        why = f"cut to what fits {choice.vram_text}; longer examples are truncated"
    elif data.longest is None:
        why = f"a default, up to the model's context{fits}"
    else:
        why = f"the data's longest sampled record, ~{data.longest} tokens estimated{fits}"
    entries.append(("data.max_length", choice.seq, why))
    entries.append(("data.eval_fraction", choice.eval_fraction, _why_eval(choice)))
    entries += [
        ("train.epochs", choice.epochs, _why_epochs(choice)),
        (
            "train.batch_size",
            inp.batch,
            f"chosen by qtune plan to fit {choice.vram_text}" if gpu else "at most 8 on a CPU",
        ),
        ("train.grad_accum", choice.grad_accum, f"effective batch {inp.batch * choice.grad_accum}"),
        ("train.lr", 2e-4, None),
        ("train.optim", inp.optim, "8-bit paged states to fit" if inp.optim != "adamw" else None),
        ("train.gradient_checkpointing", inp.gradient_checkpointing, _why_checkpointing(choice)),
    ]
    if gpu:
        entries.append(("train.fit_to_vram", choice.vram_text, "re-plans at the real longest example"))
    if choice.eval_fraction:
        steps = _planned_steps(choice)
        if steps is not None:  # (unknown data: the schema's automatic default, not written)
            every = max(1, round(steps / EVALS))
            entries.append(("train.eval_every", every, f"about {EVALS} times in {steps} steps"))
    if choice.eval_fraction:
        entries.append(("eval.limit", EVAL_LIMIT, None))
    entries += [("output.dir", "adapters", None), ("output.name", name, "the config file's name")]
    return entries


def _planned_steps(choice: Choice) -> int | None:
    """Optimizer steps of the run on the data qtune new counted (None without a file, or past COUNTED records)."""
    if choice.data.path is None or choice.data.more:
        return None
    effective = choice.plan.input.batch * choice.grad_accum
    return max(1, math.ceil(choice.data.records * (1 - choice.eval_fraction) / effective) * math.ceil(choice.epochs))


def _why_quant(choice: Choice) -> str:
    if choice.device == "cpu":
        return "no quantization: 4-bit kernels are slow on a CPU"
    if choice.plan.input.quant == "none":
        return f"16-bit weights fit {choice.vram_text} without checkpointing: faster, no quantization error"
    return f"4-bit: 16-bit weights do not fit {choice.vram_text} without recomputing activations"


def _why_eval(choice: Choice) -> str:
    if not choice.eval_fraction:
        return "too few records to hold any out"
    return f"held out of training; at most {EVAL_LIMIT} of them are evaluated"


def _why_epochs(choice: Choice) -> str | None:
    if choice.data.path is None:
        return "raise it for a small data set"
    return f"for {'more than ' if choice.data.more else ''}{choice.data.records:,} records"


def _why_checkpointing(choice: Choice) -> str:
    if choice.plan.input.gradient_checkpointing:
        return "needed to fit" if choice.device == "gpu" else "the plan takes more than half the RAM"
    return "off: the run fits without it, and is faster"


def _title(choice: Choice) -> str:
    model = choice.model_name.rstrip("/").split("/")[-1]
    if choice.device == "cpu":
        return f"{model}: LoRA on a CPU (fp32); planned memory {choice.plan.total / GIB:.2f} GiB"
    kind = "QLoRA" if choice.plan.input.quant != "none" else "LoRA (16-bit)"
    return (
        f"{model}: {kind} for {choice.vram_text} of GPU memory; planned peak {choice.plan.total / GIB:.2f} GiB "
        f"(qtune plan)"
    )


def render(choice: Choice, out: str | Path, command: str) -> str:
    """The config's YAML text: a header (what, the command that made it, how to run it), then every key with its
    schema help as a one-line comment and, where qtune new chose the value, why."""
    from qtune.config.describe import config_keys

    helps = {k.key: k.help for k in config_keys()}
    out = Path(out)
    run = f"qtune train {out}"
    lines = [f"# {_title(choice)}", f"# Run:  {run}"]
    if choice.data.path is None:
        lines[-1] += " data.train=YOUR_DATA.jsonl   (or set data.train below)"
    lines.append(f"# Made by:  {command}")
    lines += [f"# note: {n}" for n in choice.notes if not n.startswith("GPU:")]
    section = None
    for key, value, why in _entries(choice, out.stem):
        head, _, leaf = key.rpartition(".")
        if head != section:
            lines += ["", f"{head}:"] if head else [""]
            section = head
        indent = "  " if head else ""
        comment = helps[key] + (f" ({why})" if why else "")
        if why and why.startswith("CHANGE THIS"):  # the one thing a user must edit: first, where the eye lands
            comment = f"{why}. {helps[key]}"
        lines += [f"{indent}# {comment}", f"{indent}{leaf}: {_scalar(value)}"]
    return "\n".join(lines) + "\n"


def command_line(base: str, data: str | None, vram: str | None, out: str | Path) -> str:
    """The `qtune new` command for these arguments, as the header records it."""
    import shlex

    parts = ["qtune", "new", "--base", base]
    parts += ["--data", str(data)] if data is not None else []
    parts += ["--vram", vram] if vram is not None else []
    return shlex.join([*parts, "-o", str(out)])


@dataclass
class Written:
    """What `new_config` wrote: the file, the choice, and the text `qtune new` prints."""

    path: Path
    choice: Choice

    def report(self) -> str:
        choice, inp = self.choice, self.choice.plan.input
        lines = [choice.data.describe(), "", choice.plan.format(), ""]
        lines += [f"note: {n}" for n in choice.notes]
        checkpointing = "on" if inp.gradient_checkpointing else "off"
        quant = inp.quant + (" + double quant" if inp.double_quant and inp.quant != "none" else "")
        lines.append(
            f"chose: {quant}, {inp.dtype}, LoRA r={inp.lora_r}, data.max_length {inp.seq}, micro-batch {inp.batch} "
            f"x grad_accum {choice.grad_accum}, checkpointing {checkpointing}, {inp.optim}, {choice.epochs:g} epoch(s)"
        )
        lines.append(f"wrote {self.path}; run it: qtune train {self.path}")
        return "\n".join(lines)


def new_config(
    base: str, data: str | None, out: str | Path, *, vram: str | None = None, force: bool = False
) -> Written:
    """Write a commented config for `base` and `data` that `qtune.plan` says fits `vram` (see the module doc).

    `data` None writes a placeholder data path. The output is refused if it exists, unless `force`.

    Raises:
        ConfigError: `out` exists (without `force`), or has a suffix other than .yaml or .yml.
        DataError: the data cannot be read or its format told.
        PlanError: the base is unknown, `vram` unreadable, or too small (the message names what fits).
    """
    from qtune import atomic
    from qtune.config.load import from_dict

    out = Path(out)
    if out.suffix not in ("", ".yaml", ".yml"):  # (a .py would be taken for a recipe by `qtune train`)
        raise ConfigError(f"-o {out}: a config is a .yaml file; name it e.g. {out.with_suffix('.yaml').name}")
    if out.is_dir() or (out.exists() and not force):
        raise ConfigError(f"-o {out} exists: choose another name, or add --force to replace it")
    if vram is not None:
        parse_bytes(vram)  # an unreadable size is an error before the data is read
    summary = read_data(data) if data is not None else DataSummary(path=None)
    choice = choose(base, summary, vram)
    text = render(choice, out, command_line(base, data, vram, out))
    import yaml

    from_dict(yaml.safe_load(text))  # what qtune train will read: a bug here fails now, not at training time
    atomic.write_text(out, text)
    return Written(out, choice)
