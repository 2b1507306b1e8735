"""qtune: parameter-efficient fine-tuning for one consumer GPU.

The library is the core every verb shares (config, models, data, lora, meta, atomic, evaluate, classify)
and one package per verb family (train, export, serve, hub, plan); recipes/ holds the scripts that use
them, and `qtune <verb>` is the command line. docs/architecture.md is the map.
"""

__version__ = "0.1.0"
# The name pip installs qtune under (`qtune` on PyPI is another project); the import name stays `qtune`.
DISTRIBUTION = "qtune-lora"
