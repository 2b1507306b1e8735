"""The memory planner (`qtune plan`) for the page: a model, VRAM, sequence length, LoRA rank, quantization."""

from __future__ import annotations

from typing import Any

from qtune.studio.common import ApiError, Studio, api, inside, read_json

MAX_SEQ = 1 << 20
MAX_LORA_R = 4096
MAX_BATCH = 4096


def _positive(body: dict[str, Any], key: str, default: int, most: int) -> int:
    """A positive integer field (a whole number in a string is taken too), or a 400 naming it."""
    value = body.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
        raise ApiError(400, f"{key} must be a whole number from 1 to {most:,}, got {value!r}", key)
    return value


def _arch(studio: Studio, model: Any) -> dict:
    """A built-in architecture (or a hub id it is known under), or a model folder inside the project."""
    from qtune.plan import ALIASES, BUILTIN, PlanError, load_arch

    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, f"model: give one of {', '.join(BUILTIN)}", "model")
    key = model.strip().lower()
    if key not in BUILTIN and key not in ALIASES:
        # Nothing is fetched from the hub here: a local folder with a config.json (its resolved path, so that
        # load_arch never takes the name for a hub id), or a 400.
        folder = inside(studio, model.strip(), "model", "model")
        if not (folder / "config.json").is_file():
            raise ApiError(
                400, f"model: unknown model {model!r}; give one of {', '.join(BUILTIN)} or a model folder", "model"
            )
        key = str(folder)
    try:
        return load_arch(key)
    except PlanError as e:
        raise ApiError(400, f"model: {e}", "model") from None


def plan(studio: Studio, body: dict[str, Any]) -> dict[str, Any]:
    """The plan of a default training config's run with the page's model, VRAM, seq, LoRA rank, quant, batch and
    gradient checkpointing (every layer when on, as `qtune plan --gradient-checkpointing on`)."""
    from qtune.config import RunConfig
    from qtune.plan import COMPONENTS, QUANTS, PlanError, PlanInput, estimate, frugal, parse_bytes, refuse_too_small

    cfg = RunConfig()  # the run `qtune train` would start but for these fields (qtune plan's defaults too)
    arch = _arch(studio, body.get("model"))
    seq = _positive(body, "seq", cfg.data.max_length, MAX_SEQ)
    batch = _positive(body, "batch", cfg.train.batch_size, MAX_BATCH)
    lora_r = _positive(body, "lora_r", cfg.lora.r, MAX_LORA_R)
    quant = body.get("quant") or cfg.quant.method
    if quant not in QUANTS:
        raise ApiError(400, f"quant must be one of {', '.join(QUANTS)}, got {quant!r}", "quant")
    vram = body.get("vram")
    if vram is not None and vram != "":
        if not isinstance(vram, (str, int, float)) or isinstance(vram, bool):
            raise ApiError(400, f"vram: give a size such as 12GB, got {vram!r}", "vram")
        try:
            vram = parse_bytes(str(vram))
        except PlanError as e:
            raise ApiError(400, str(e).replace("--vram", "vram"), "vram") from None
    else:
        vram = None
    checkpointing = body.get("gradient_checkpointing") or ("on" if cfg.train.gradient_checkpointing else "off")
    if checkpointing not in ("on", "off"):
        raise ApiError(
            400, f"gradient_checkpointing must be on or off, got {checkpointing!r}", "gradient_checkpointing"
        )
    inp = PlanInput.from_config(
        cfg, seq=seq, batch=batch, lora_r=lora_r, quant=quant, vram=vram, gradient_checkpointing=checkpointing == "on"
    )
    result = estimate(arch, inp)
    # The longest sequence any setting fits: micro-batch 1 with every layer checkpointed (what train.fit_to_vram
    # falls back to), not only at this batch without checkpointing (the text's "longest seq at batch N").
    longest = estimate(arch, frugal(inp)).max_seq
    text = result.format()
    if longest is not None:
        text += f"\nlongest seq at micro-batch 1 with gradient checkpointing (train.fit_to_vram): {longest:,}"
    try:
        refuse_too_small(arch, inp)
    except PlanError as e:
        text += f"\nnote: {str(e).replace('--vram', 'vram').replace('--seq', 'seq')}"
    return {
        "fits": result.fits,
        "vram_bytes": vram,
        "total_bytes": result.total,
        "parts": [{"name": name, "bytes": result.breakdown[name]} for name in COMPONENTS],
        "longest_seq": longest,
        "text": text,
    }


def routes(studio: Studio) -> list:
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def models(request):
        from qtune.plan import BUILTIN

        return JSONResponse({"models": list(BUILTIN)})

    async def post(request):
        body = await read_json(request)
        return JSONResponse(await run_in_threadpool(plan, studio, body))  # reads a model folder, imports the planner

    return [
        Route("/api/plan/models", api(models), methods=["GET"]),
        Route("/api/plan", api(post), methods=["POST"]),
    ]
