"""The run configuration: one dataclass per concern, each field typed, defaulted and documented in one line.

A config file's top-level keys are the fields of `RunConfig` (`model`, `quant`, `lora`, `data`, `train`,
`output`, `eval`); qtune/config/load.py reads YAML and dotted overrides into it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from qtune.errors import ConfigError  # noqa: F401  (re-exported)


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name: str = _help("Base model: 'smollm2-135m' (embedded), a local HF folder, or a hub id.", "smollm2-135m")
    revision: str | None = _help("Hub revision (branch, tag or commit) when `name` is a hub id.", None)
    dtype: Literal["bf16", "fp16", "fp32"] = _help("Compute dtype of the base and the LoRA matmuls.", "bf16")
    trust_remote_code: bool = _help("Run model code shipped with a hub repo. Off unless you trust it.", False)


@dataclass
class QuantConfig:
    method: Literal["nf4", "fp4", "int8", "none"] = _help("How the frozen base weights are stored.", "nf4")
    double_quant: bool = _help("Quantize the 4-bit block scales too (saves ~0.37 bit/weight).", True)


@dataclass
class LoraConfig:
    r: int = _help("LoRA rank.", 16)
    alpha: float = _help("LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).", 32.0)
    dropout: float = _help("Dropout on the LoRA input; 0 skips it (it cost 13% of a CPU step when on).", 0.0)
    targets: str | list[str] = _help("'all-linear' or a list of module names to adapt.", "all-linear")
    rslora: bool = _help("Rank-stabilised scaling alpha / sqrt(r).", False)
    dora: bool = _help("Weight-decomposed LoRA (DoRA); slower per step.", False)
    modules_to_save: list[str] = _help("Modules trained in full and saved with the adapter.", factory=list)
    from_adapter: str | None = _help(
        "Start from this trained adapter folder (of the same base) instead of fresh LoRA weights; its own r, alpha "
        "and targets are used. DPO/KTO/GRPO: the reference is this adapter as it was (a frozen copy of its LoRA "
        "weights, never a second base); without it, the base itself.",
        None,
    )

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            # `lora.targets=q_proj,v_proj` on the command line: module names, not one regex for peft
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.targets, list) and not self.targets:
            raise ConfigError("lora.targets is empty: use 'all-linear' or name at least one module")


FORMAT = Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "text"]


@dataclass
class SourceConfig:
    """One training source of a `data.train` list; format and columns default to data.format and data.columns."""

    SHORTHAND = "path"  # a list item written as plain text is the path

    path: str = _help(
        "A .jsonl, .json, .csv, .parquet or .arrow file, a saved `datasets` folder, or a hub dataset id.", ""
    )
    format: FORMAT | None = _help("This source's record format (default: data.format).", None)
    columns: dict[str, str] | None = _help("This source's column mapping (default: data.columns).", None)
    weight: float = _help(
        "Sampling weight: each training example of this source is seen `weight` times per epoch (2: twice; "
        "0.5: a seeded half of them).",
        1.0,
    )
    cap: int | None = _help("Take at most this many examples from this source (a seeded sample).", None)

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("a data.train source has no path: write `- path: FILE` (or just `- FILE`)")
        if not (self.weight > 0 and self.weight < float("inf")):
            raise ConfigError(f"{self.path}: weight must be a positive number, got {self.weight}")
        if self.cap is not None and self.cap <= 0:
            raise ConfigError(f"{self.path}: cap must be a positive number of examples, got {self.cap}")


@dataclass
class DataConfig:
    train: str | list[SourceConfig] = _help(
        "Training data: .jsonl, .json, .csv, .parquet, .arrow, a saved `datasets` folder, or a hub dataset id "
        "(owner/name or owner/name:split, through the Hugging Face cache); or a list of sources, each "
        "{path, format, columns, weight, cap}.",
        "",
    )
    eval: str | None = _help("Held-out file in the same format (optional).", None)
    eval_fraction: float = _help(
        "Without data.eval: hold out this fraction of the training records (seeded by train.seed) for evaluation.", 0.0
    )
    format: FORMAT = _help("Record format; 'auto' detects it from the fields of the first record.", "auto")
    columns: dict[str, str] = _help(
        "Where the file's columns hold the format's fields, e.g. {prompt: question, completion: answer} or "
        "{messages: dialogue}: field -> column.",
        factory=dict,
    )
    chat_template: str = _help(
        "How chat records are rendered: 'base' (the tokenizer's own), chatml, llama-3, mistral, gemma, alpaca, or "
        "a .jinja file. Stored with the adapter: generate, eval, serve and export use it too.",
        "base",
    )
    system_prompt: str | None = _help("System message prepended to chat/alpaca records that have none.", None)
    max_length: int = _help("Longest tokenized example, in tokens.", 1024)
    overlong: Literal["truncate", "reject"] = _help("What to do with examples over max_length.", "truncate")
    text_field: str = _help("Classification: the field holding the text.", "text")
    label_field: str = _help("Classification: the field holding the label (text or integer).", "label")
    loss_on: Literal["assistant", "all"] = _help(
        "Train on assistant/completion tokens only, or on every token.", "assistant"
    )
    num_proc: int = _help(
        "Processes that tokenize a large file (0: one per CPU core, up to 8, for 20,000 records or more).", 0
    )

    def __post_init__(self) -> None:
        if self.max_length <= 0:
            raise ConfigError(f"data.max_length must be positive, got {self.max_length}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval:
            raise ConfigError("data.eval and data.eval_fraction both set: give a held-out file or a fraction, not both")
        if self.num_proc < 0:
            raise ConfigError(f"data.num_proc must be >= 0 (0: automatic), got {self.num_proc}")
        if isinstance(self.train, list) and not self.train:
            raise ConfigError("data.train is an empty list: name at least one source")

    def sources(self) -> list[SourceConfig]:
        """The training sources, each with its format and columns resolved (a single path is one source)."""
        listed = self.train if isinstance(self.train, list) else [SourceConfig(path=self.train)] if self.train else []
        return [
            dataclasses.replace(
                s,
                format=self.format if s.format is None else s.format,
                columns=dict(self.columns) if s.columns is None else s.columns,
            )
            for s in listed
        ]


@dataclass
class TrainConfig:
    max_steps: int = _help("Optimizer steps; 0 means run `epochs` instead.", 0)
    epochs: float = _help("Passes over the training data when max_steps is 0.", 1.0)
    batch_size: int = _help("Examples per device per micro-batch.", 8)
    grad_accum: int = _help("Micro-batches per optimizer step.", 1)
    lr: float = _help("Peak learning rate.", 2e-4)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _help("LR schedule.", "cosine")
    warmup: float = _help("Warm-up: a fraction of all steps if < 1, else a step count.", 0.05)
    weight_decay: float = _help("AdamW weight decay on LoRA weights.", 0.0)
    max_grad_norm: float = _help("Gradient clipping norm (0: no clipping).", 1.0)
    optim: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = _help("Optimizer.", "adamw")
    gradient_checkpointing: bool = _help("Recompute activations in backward (non-reentrant).", False)
    checkpoint_every: int = _help(
        "With gradient_checkpointing: recompute only every k-th decoder layer (1: all; 2: half), keeping the "
        "others' activations -- less recomputation for more memory (selective checkpointing, as in torchtune). "
        "train.fit_to_vram checkpoints all layers or none.",
        1,
    )
    pad_to_multiple_of: int = _help(
        "Pad each micro-batch's length up to a multiple of this (0: to its longest example only). Fewer distinct "
        "shapes: on a CPU each new one grows the memory oneDNN and the allocator keep (docs/performance.md).",
        8,
    )
    group_by_length: bool = _help("Batch examples of similar length together (less padding).", True)
    padding_free: bool = _help(
        "Causal LM: concatenate each micro-batch into one row without padding; position_ids keep the examples from "
        "attending to each other. Pays with flash attention (varlen kernels); on a CPU, sdpa's block-diagonal mask "
        "over the whole row cost 22% of the speed on the demo (docs/performance.md).",
        False,
    )
    chunked_loss: bool = _help(
        "Causal LM: logits only at trained positions, cross-entropy in fp32 chunks. Off: trl's fused LM-head loss, "
        "which scores every position on a CPU.",
        True,
    )
    fit_to_vram: str | None = _help(
        "GPU memory to fit (e.g. 8GB): choose micro-batch, grad_accum and checkpointing from `qtune plan`.", None
    )
    vram: str | None = _help(
        "GPU memory the run must fit (e.g. 12GB): a run `qtune plan` says needs more, at the longest example, is "
        "refused before the model loads, naming the setting to change. Unset: no check.",
        None,
    )
    fsdp: bool = _help(
        "Shard the base, adapters and optimizer over the processes of a torchrun / accelerate launch (FSDP); "
        "4-bit weights are then stored in the compute dtype so they shard. Off: each process holds a copy (DDP).",
        False,
    )
    seed: int = _help("Seed for data order, dropout and LoRA init.", 42)
    logging_steps: int = _help("Log the loss every N steps.", 5)
    save_every: int = _help(
        "Write a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) every N steps; 0: never.",
        50,
    )
    save_limit: int = _help("Complete checkpoints kept while training (older ones are deleted).", 2)
    on_nonfinite: Literal["stop", "skip"] = _help(
        "A NaN/inf loss or gradient: stop with the last good weights saved, or skip that optimizer step.", "stop"
    )
    eval_every: int | None = _help(
        "Held-out loss every N steps while training (0: never). Unset: every train.save_every steps when data.eval "
        "or data.eval_fraction gives held-out data, and once more at the last step.",
        None,
    )
    eval_max_examples: int = _help(
        "The held-out loss while training is taken on at most this many held-out examples (a seeded sample, the "
        "same each time), so it stays cheap; all of them are scored once after training.",
        200,
    )
    report_to: str | list[str] = _help(
        "Where the trainer also logs: tensorboard, wandb, trackio, mlflow, comet_ml, clearml, dvclive, neptune, "
        "swanlab, none, or a list. auto: TensorBoard under <output.dir>/<output.name>.runs/ when the tensorboard "
        "package is installed (pip install 'qtune-lora[tensorboard]'), else none.",
        "auto",
    )

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "logging_steps", "save_limit", "checkpoint_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.pad_to_multiple_of < 0:
            raise ConfigError(
                f"train.pad_to_multiple_of must be >= 0 (0: no extra padding), got {self.pad_to_multiple_of}"
            )
        if self.max_steps < 0:
            raise ConfigError(f"train.max_steps must be >= 0, got {self.max_steps}")
        if self.save_every < 0:
            raise ConfigError(f"train.save_every must be >= 0 (0: no checkpoints), got {self.save_every}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("train.max_steps is 0 and train.epochs is not positive: set one of them")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.warmup < 0:
            raise ConfigError(f"train.warmup must be >= 0, got {self.warmup}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:  # (a negative norm would switch clipping off without a word)
            raise ConfigError(f"train.max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if self.eval_every is not None and self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0 (0: never; unset: automatic), got {self.eval_every}")
        if self.eval_max_examples <= 0:
            raise ConfigError(f"train.eval_max_examples must be positive, got {self.eval_max_examples}")
        self.report_to = _report_to(self.report_to)
        for key in ("fit_to_vram", "vram"):
            if getattr(self, key) is not None:
                from qtune.plan import PlanError, parse_bytes

                try:
                    parse_bytes(getattr(self, key))
                except PlanError as e:
                    raise ConfigError(f"train.{key}: {e}") from None


# What train.report_to accepts: transformers' own logging integrations (it holds their callbacks), and auto / none.
REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "clearml", "dvclive", "neptune", "swanlab")


def _report_to(value: str | list[str]) -> str | list[str]:
    """train.report_to checked: 'auto', 'none', one integration, or a list of them (`a,b` on the command line)."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    if names in (["auto"], ["none"]):
        return names[0]
    if {"auto", "none"} & set(names):
        raise ConfigError(f"train.report_to: auto and none stand alone, not in a list ({', '.join(names)})")
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown or not names:
        raise ConfigError(
            f"train.report_to: unknown {', '.join(map(repr, unknown)) or 'empty value'}; valid: auto, none, "
            f"{', '.join(REPORT_TO)}, or a list of them"
        )
    return names[0] if isinstance(value, str) and len(names) == 1 else names


@dataclass
class DpoConfig:
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "kto"] = _help(
        "Preference loss: sigmoid (DPO), ipo, hinge (SLiC), robust (noisy labels) on (prompt, chosen, rejected) "
        "pairs; kto on (prompt, completion, label) records (a pair file gives one good and one bad record per pair).",
        "sigmoid",
    )
    beta: float = _help("How far the adapter may move from the reference: higher keeps it closer.", 0.1)
    label_smoothing: float = _help("sigmoid/robust: the assumed fraction of wrongly labelled pairs (0: none).", 0.0)

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ConfigError(f"dpo.label_smoothing applies to dpo.loss=sigmoid or robust, not {self.loss}")


@dataclass
class GrpoConfig:
    rewards: list[str] = _help(
        "Reward functions, each a `module:function` path (a module importable from the working folder, or a .py "
        "file path before the colon); shipped in recipes/rewards.py: exact_answer, contains_reference, format_match, "
        "brevity. Each takes (prompts, completions, reference, **kwargs) and returns one float per "
        "completion.",
        factory=lambda: ["recipes.rewards:exact_answer"],
    )
    reward_weights: list[float] | None = _help("One weight per reward function (default: 1 each).", None)
    group_size: int = _help("Completions sampled per prompt; rewards are compared within each group.", 4)
    max_new_tokens: int = _help("Longest sampled completion, in tokens.", 32)
    temperature: float = _help("Sampling temperature of the completions.", 1.0)
    beta: float = _help(
        "KL coefficient against the reference (0: no reference forward, the cheapest; 0.04 as in DeepSeekMath).", 0.0
    )

    def __post_init__(self) -> None:
        if isinstance(self.rewards, str):  # grpo.rewards=a:b,c:d on the command line
            self.rewards = [r.strip() for r in self.rewards.split(",") if r.strip()]
        if not self.rewards:
            raise ConfigError("grpo.rewards is empty: name at least one reward function (module:function)")
        for path in self.rewards:
            if ":" not in path:
                raise ConfigError(f"grpo.rewards: {path!r} is not module:function (e.g. recipes.rewards:exact_answer)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(
                f"grpo.reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} rewards"
            )
        if self.group_size < 2:
            raise ConfigError(
                f"grpo.group_size must be at least 2 (rewards are compared in a group), got {self.group_size}"
            )
        if self.max_new_tokens <= 0:
            raise ConfigError(f"grpo.max_new_tokens must be positive, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ConfigError(f"grpo.temperature must be positive, got {self.temperature}")
        if self.beta < 0:
            raise ConfigError(f"grpo.beta must be >= 0, got {self.beta}")


@dataclass
class EvalConfig:
    batch_size: int = _help("Examples per batch when evaluating and generating.", 16)
    max_new_tokens: int = _help("Generation budget for answer accuracy.", 16)
    limit: int | None = _help("Evaluate on at most this many records (None: all).", None)

    def __post_init__(self) -> None:
        for key in ("batch_size", "max_new_tokens"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"eval.{key} must be positive, got {getattr(self, key)}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval.limit must be positive or null, got {self.limit}")


@dataclass
class OutputConfig:
    dir: str = _help("Parent folder of trained adapters.", "adapters")
    name: str | None = _help("Adapter folder name; default: the config file's stem.", None)
    overwrite: bool = _help("Replace an existing adapter folder of the same name.", False)
    keep_checkpoints: bool = _help("Keep <dir>/<name>.checkpoints/ after the adapter is written.", False)


@dataclass
class RunConfig:
    recipe: str = _help(
        "Recipe that runs this config: 'sft', 'classify', 'dpo' (DPO/KTO), 'grpo', or a path to your own recipe .py.",
        "sft",
    )
    resume: str | None = _help(
        "'auto': continue from the newest complete checkpoint of this run (or start if there is none); "
        "or a checkpoint folder. Unset: refuse to start over an interrupted run's checkpoints.",
        None,
    )
    model: ModelConfig = _help("Base model.", factory=ModelConfig)
    quant: QuantConfig = _help("Quantization of the base.", factory=QuantConfig)
    lora: LoraConfig = _help("LoRA adapter.", factory=LoraConfig)
    data: DataConfig = _help("Training and evaluation data.", factory=DataConfig)
    train: TrainConfig = _help("Optimisation.", factory=TrainConfig)
    dpo: DpoConfig = _help("Preference tuning (recipe: dpo).", factory=DpoConfig)
    grpo: GrpoConfig = _help("Reinforcement learning with reward functions (recipe: grpo).", factory=GrpoConfig)
    eval: EvalConfig = _help("Evaluation.", factory=EvalConfig)
    output: OutputConfig = _help("Where the adapter is written.", factory=OutputConfig)
