"""Errors the user can act on: bad input (a data file, a flag, a checkpoint) and a run that must stop.

The command line prints these as one message and a non-zero exit instead of a traceback, because the message
already says what is wrong, where (file, line, key or flag) and what to do; any other exception is a bug and keeps
its traceback.
"""


class InputError(ValueError):
    """Input that cannot be used as given: the message names the file, line, key or flag at fault."""


class IncompatibleResume(InputError):
    """A checkpoint belongs to a run with other settings (model, optimiser, schedule, data, seed) than this one."""


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (a non-finite loss or gradient, or too many skipped steps) before applying
    the update that caused it; the message names the step and what to do."""
