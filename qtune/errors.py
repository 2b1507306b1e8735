"""The errors qtune shows a user: each says what was wrong, where, and what to do.

They live in one light module (no torch import) so the command line can catch them without
loading the training stack; each module re-exports its own (`qtune.config.ConfigError`, ...).
"""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key to change."""


class DataError(ValueError):
    """Bad data; the message names the file, row and field of each problem."""


class ModelError(RuntimeError):
    """A base model could not be found, converted or loaded; the message says what to do."""


class AdapterError(RuntimeError):
    """An adapter folder is missing, incomplete, or does not belong to the base it is loaded onto."""


class PlanError(ValueError):
    """A planner input is invalid or unknown; the message names the flag to change."""


class ExportError(RuntimeError):
    """A merge or export was refused or failed; the message names the file or flag and what to do."""


class TrainingError(RuntimeError):
    """Training stopped on purpose (a NaN/inf loss or gradient); the message says where and how to go on."""


class MissingExtraError(RuntimeError):
    """An optional dependency is not installed; the message names the extra that brings it."""


USER_ERRORS = (
    ConfigError,
    DataError,
    ModelError,
    AdapterError,
    PlanError,
    ExportError,
    TrainingError,
    MissingExtraError,
)
