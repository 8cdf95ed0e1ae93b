"""Errors the user can act on: bad input (a data file, a flag, a checkpoint) and a run that must stop.

The command line prints these as one message and a non-zero exit instead of a traceback, because the message
already says what is wrong, where (file, line, key or setting) and what to do; any other exception is a bug and keeps
its traceback.

A message names a setting as Python spells it, `<Class>.<field>` (`ModelConfig.n_kv_heads`,
`TextDataModule.num_workers`, `TextDataModule.sources[1].weight`), never as a flag: a Python user sees what they
set, and the command line prints it as the flag that sets it (`--model.config.n_kv_heads`; the table is
`FLAG_PREFIXES` in cli.py).
"""


class InputError(ValueError):
    """Input that cannot be used as given: the message names the file, line, key or setting at fault."""


class IncompatibleResume(InputError):
    """A checkpoint belongs to a run with other settings (model, optimiser, schedule, data, seed) than this one."""


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (a non-finite loss or gradient, or too many skipped steps) before applying
    the update that caused it; the message names the step and what to do."""


class ConfigError(InputError):
    """A configuration value that cannot be used, alone or with another one; `field` names the config field at
    fault, so that the command line can tell a value it was given from one read from a checkpoint (`init_from`),
    which no flag set."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # keep `field` when the error crosses processes (multiprocessing pickles exceptions)
        return type(self), (str(self), self.field)


class CheckpointNotSaved(InputError):
    """A checkpoint could not be written (no space left on the device, no permission): the message names the file
    and the cause, and whatever the path held before is unchanged. An InputError, like a bad path, because the place
    it is written to is what the user must change or free; it is not a bug, so it needs no traceback."""
