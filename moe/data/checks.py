"""The data module's checks: its arguments, refused naming the setting (`TextDataModule.<name>`) before they fail
later with a traceback or run a wrong job, and the comparison of a checkpoint's resume fingerprint with this run's.
"""

from __future__ import annotations

from moe.data.sources import Source
from moe.errors import InputError

# How each part of the resume fingerprint is set, for the message that refuses a resume.
FINGERPRINT_LABELS = {
    "sources": "TextDataModule.sources (name, content hash, weight)",
    "tokenizer": "tokenizer (hash of its JSON)",
    "seq_len": "TextDataModule.seq_len",
    "seed": "TextDataModule.seed",
    "val_fraction": "TextDataModule.val_fraction",
    "global_batch_size": "global batch size (TextDataModule.batch_size x data-parallel devices: Trainer.devices x "
                         "Trainer.num_nodes / tensor-parallel size)",
    "accumulate_grad_batches": "Trainer.accumulate_grad_batches (micro-batches per optimizer step, so the tokens "
    "per step are those of the global batch times this)",
    "schedule": "mixture schedule version",
    "token_cache": "token cache (CRC-32 of each source's token array)",
}


def check_arguments(
    sources: list[Source] | None,
    tokenizer: str | None,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    val_fraction: float,
    num_workers: int,
    num_proc: int | None,
    seed: int,
    corpus_max_bytes: int | None,
    planned_tokens: int | None,
    prompts: list[str],
) -> None:
    """Refuse, naming the setting (`TextDataModule.<name>`), the arguments that would otherwise fail later with a
    traceback or run a wrong job."""
    checks = [
        ("seq_len", seq_len, seq_len >= 1, ">= 1"),
        ("batch_size", batch_size, batch_size >= 1, ">= 1"),
        ("num_workers", num_workers, num_workers >= 0, ">= 0 (0 loads batches in the training process)"),
        ("num_proc", num_proc, num_proc is None or num_proc >= 1, ">= 1, or null for every core"),
        ("seed", seed, seed >= 0, ">= 0"),
        # A NaN fails every comparison, so it is refused too.
        ("val_fraction", val_fraction, 0 <= val_fraction < 1, "in [0, 1)"),
        ("corpus_max_bytes", corpus_max_bytes, corpus_max_bytes is None or corpus_max_bytes >= 1,
         ">= 1, or null for the whole corpus"),
        ("planned_tokens", planned_tokens, planned_tokens is None or planned_tokens >= 1,
         ">= 1, or null to derive it from Trainer.max_steps"),
        # Only a trained tokenizer needs it; a given one brings its own vocabulary.
        ("vocab_size", vocab_size, tokenizer is not None or vocab_size >= 257,
         ">= 257 (the 256 bytes and the end-of-text token) to train a tokenizer"),
    ]
    for name, value, valid, expected in checks:
        if not valid:
            raise InputError(f"TextDataModule.{name}={value} must be {expected}")
    for index, source in enumerate(sources or []):
        if not source.weight > 0:  # NaN too
            raise InputError(f"TextDataModule.sources[{index}].weight={source.weight} must be positive "
                             f"(source {source.path!r})")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise InputError(f"TextDataModule.prompts[{index}] is empty; a prompt needs at least one character to "
                             "continue")


def fingerprint_changes(saved: dict, current: dict, cache_files: list[str]) -> list[str]:
    """One line per part of the resume fingerprint that differs between a checkpoint and this run. A key missing
    from the checkpoint was added to the fingerprint after it was written: it cannot be compared, and refusing would
    make every run started before then impossible to resume."""
    labels = {**FINGERPRINT_LABELS}
    labels["token_cache"] += f" in {', '.join(cache_files)}"
    return [f"{labels.get(key, key)}: checkpoint {saved[key]!r}, now {current[key]!r}"
            for key in current if key in saved and saved[key] != current[key]]


def check_vocabulary(datamodule, vocab_size: int, origin: str, stage: str) -> None:
    """Refuse a model whose embedding does not cover the tokenizer's ids or, except for predict (which only encodes
    prompts), the ids in the token arrays. `origin` says where the model's vocab_size came from, for the message."""
    if datamodule.n_vocab > vocab_size:
        raise InputError(f"the tokenizer has {datamodule.n_vocab} token ids but the model's vocab_size is "
                         f"{vocab_size}{origin}, so ids past it have no embedding; use the tokenizer the model was "
                         f"trained with (TextDataModule.tokenizer) or a model with vocab_size >= {datamodule.n_vocab}")
    if stage == "predict":
        return
    max_id = datamodule.max_token_id()
    if max_id >= vocab_size:
        raise InputError(f"the data holds token id {max_id}, beyond the model's vocab_size={vocab_size}{origin} "
                         "(ids must be < vocab_size); was the cache built with another tokenizer?")
