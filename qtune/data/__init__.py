"""Training data: read sources into records (read.py), recognise their format, map their columns and validate
every record (formats.py), tokenize each with its loss mask (encode.py), load a whole source into Arrow files on
disk (load.py, store.py), and combine a run's sources with caps, weights and a held-out split (sources.py).
Preference pairs and judged completions for DPO and KTO (preference.py) and GRPO's prompts (prompts.py) are
validated with formats.py's helpers and tokenized by the same `encode`. Errors name the file, the row and the field."""

from qtune.config import DataConfig
from qtune.data.encode import IGNORE, chat_segments, encode
from qtune.data.formats import FORMATS, SHAREGPT_ROLES, detect_format
from qtune.data.load import DataReport, load_examples, to_dataset
from qtune.data.preference import Judged, Pair, judged_dataset, load_judged, load_pairs, longest, pairs_dataset
from qtune.data.prompts import Prompted, load_prompts, prompts_dataset
from qtune.data.read import fingerprint_data, iter_records, raise_all, read_records
from qtune.data.sources import HeldOut, describe, hold_out, load_train, weighted
from qtune.data.store import Example, Examples
from qtune.data.templates import TEMPLATES, apply_template, resolve_template
from qtune.errors import DataError

__all__ = [
    "FORMATS",
    "IGNORE",
    "DataConfig",
    "DataError",
    "DataReport",
    "Example",
    "Examples",
    "HeldOut",
    "SHAREGPT_ROLES",
    "TEMPLATES",
    "Judged",
    "Pair",
    "Prompted",
    "apply_template",
    "chat_segments",
    "describe",
    "detect_format",
    "encode",
    "fingerprint_data",
    "hold_out",
    "iter_records",
    "judged_dataset",
    "load_examples",
    "load_judged",
    "load_pairs",
    "load_prompts",
    "load_train",
    "longest",
    "pairs_dataset",
    "prompts_dataset",
    "raise_all",
    "read_records",
    "resolve_template",
    "to_dataset",
    "weighted",
]
