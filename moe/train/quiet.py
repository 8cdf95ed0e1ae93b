"""Messages from the libraries under the command line that are wrong for this project, silenced by the CLI.

Each entry says why it does not apply. Anything not listed here is shown as the library writes it.
"""

from __future__ import annotations

import logging
import warnings

# (message regex, why it is wrong here)
WARNINGS = [
    (r".*your dataloader is not resumable",
     "the data module resumes exactly: its sampler's position is in the checkpoint (moe/data/sampler.py)"),
    (r"Checkpoint directory .* exists and is not empty",
     "a resumed fit continues in its own run folder on purpose (moe/train/run_paths.py); new runs claim new ones"),
    (r".*isinstance\(treespec, LeafSpec\)",
     "raised inside Lightning by its use of torch's pytree API, nothing a user can change"),
]
# Lightning's advertisement for its hosted logger, printed at every Trainer construction, and its note that it
# uses the summary callback the CLI gives (moe.train.summary) instead of its own.
INFO_LINES = ["litlogger", "Skipping setting a default `ModelSummary`"]


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in INFO_LINES)


def silence_misleading_messages() -> None:
    """Install the filters (idempotent: warnings' filters and a logger's are deduplicated by equality/identity)."""
    for pattern, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    try:  # Lightning's own CLI calls jsonargparse functions that jsonargparse has deprecated
        from jsonargparse._deprecated import JsonargparseDeprecationWarning

        warnings.filterwarnings("ignore", category=JsonargparseDeprecationWarning)
    except ImportError:
        pass
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines())
