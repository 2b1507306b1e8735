"""Merge and export: `qtune merge` (merge.py), `qtune export --format peft` (peft.py), `--format gguf` and
`--format gguf-lora` for llama.cpp / Ollama (gguf.py). Each reads the adapter once and writes atomically."""

from qtune.export.gguf import export_gguf, export_gguf_lora, write_gguf
from qtune.export.merge import MERGE_FILE, Source, adapter_fingerprint, merge, merged_model, read_source
from qtune.export.peft import export_peft

__all__ = [
    "MERGE_FILE",
    "Source",
    "adapter_fingerprint",
    "export_gguf",
    "export_gguf_lora",
    "export_peft",
    "merge",
    "merged_model",
    "read_source",
    "write_gguf",
]
