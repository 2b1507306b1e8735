"""Will this run fit my GPU? Architectures from config alone (arch.py), the bytes of each part of a run
(memory.py), and the plan, its verdict and the search for what fits (planner.py)."""

from qtune.plan.arch import (
    ALIASES,
    BUILTIN,
    DTYPE_BYTES,
    QUANTS,
    PlanError,
    load_arch,
    quant_constant_bytes,
    weight_bytes,
)
from qtune.plan.memory import COMPONENTS, MIB, trained_positions
from qtune.plan.planner import GIB, Plan, PlanInput, estimate, fit_to_vram, frugal, parse_bytes, refuse_too_small

__all__ = [
    "ALIASES",
    "BUILTIN",
    "COMPONENTS",
    "DTYPE_BYTES",
    "GIB",
    "MIB",
    "QUANTS",
    "Plan",
    "PlanError",
    "PlanInput",
    "estimate",
    "fit_to_vram",
    "frugal",
    "load_arch",
    "parse_bytes",
    "quant_constant_bytes",
    "refuse_too_small",
    "trained_positions",
    "weight_bytes",
]
