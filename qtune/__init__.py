"""qtune: parameter-efficient fine-tuning for one consumer GPU.

The library is a box of small parts (config, models, lora, data, train, evaluate, report);
recipes/ holds the scripts that use them, and `qtune <verb>` is the command line.
"""

__version__ = "0.1.0"
