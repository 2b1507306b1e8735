"""Training data: read local files into records (read.py), recognise their format, map their columns and
validate every record (formats.py), and tokenize it with its loss mask (encode.py). Errors name the file,
the row and the field."""

from qtune.config import DataConfig
from qtune.data.encode import (
    ALPACA_TEMPLATE,
    IGNORE,
    DataReport,
    Example,
    HeldOut,
    chat_segments,
    encode,
    hold_out,
    load_examples,
    to_dataset,
)
from qtune.data.formats import FORMATS, SHAREGPT_ROLES, detect_format
from qtune.data.read import fingerprint_data, raise_all, read_records
from qtune.data.templates import TEMPLATES, apply_template, resolve_template
from qtune.errors import DataError

__all__ = [
    "ALPACA_TEMPLATE",
    "FORMATS",
    "IGNORE",
    "DataConfig",
    "DataError",
    "DataReport",
    "Example",
    "HeldOut",
    "SHAREGPT_ROLES",
    "TEMPLATES",
    "apply_template",
    "chat_segments",
    "detect_format",
    "encode",
    "fingerprint_data",
    "hold_out",
    "load_examples",
    "raise_all",
    "read_records",
    "resolve_template",
    "to_dataset",
]
