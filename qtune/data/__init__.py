"""Training data: read local files into records (read.py), then recognise their format, validate every
record and tokenize it with its loss mask (encode.py). Errors name the file, the row and the field."""

from qtune.config import DataConfig
from qtune.data.encode import (
    ALPACA_TEMPLATE,
    FORMATS,
    IGNORE,
    DataReport,
    Example,
    chat_segments,
    detect_format,
    encode,
    load_examples,
    to_dataset,
)
from qtune.data.read import fingerprint_data, raise_all, read_records
from qtune.errors import DataError

__all__ = [
    "ALPACA_TEMPLATE",
    "FORMATS",
    "IGNORE",
    "DataConfig",
    "DataError",
    "DataReport",
    "Example",
    "chat_segments",
    "detect_format",
    "encode",
    "fingerprint_data",
    "load_examples",
    "raise_all",
    "read_records",
    "to_dataset",
]
