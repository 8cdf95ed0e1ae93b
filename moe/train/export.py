"""Export a Lightning checkpoint of `LanguageModel` to an HF model directory (weights, config.json, tokenizer).

The directory loads with transformers' AutoModelForCausalLM and AutoTokenizer, so lm-evaluation-harness (its
`hf` model), vLLM or any HF tool can use a checkpoint trained here.

The export is written to a temporary directory beside the target and renamed into place, so a failure (a full
disk, a model HF cannot represent) leaves the target as it was. The target may be new, an empty directory or a
previous export, which is replaced whole (re-exporting after more training is the common case, and a previous
export holds nothing but what the new one rewrites); any other existing path is refused, since replacing it
would delete files the export does not own and merging into it would leave a mixture of two models.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from moe.data.tokenizer import eos_id
from moe.errors import InputError
from moe.hf import INDEX_FILE, SINGLE_FILE, save_hf_checkpoint
from moe.hf_tokenizer import save_hf_tokenizer
from moe.train.checkpoint import load_lightning_checkpoint

# Every file an export writes (moe.hf.save_hf_checkpoint, moe.hf_tokenizer.save_hf_tokenizer).
EXPORT_FILES = {"config.json", SINGLE_FILE, INDEX_FILE, "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json"}
_WEIGHT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def export_to_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `checkpoint` as an HF model directory at `out_dir` (new, empty, or a previous export, which is
    replaced); anything else at `out_dir` raises an InputError naming it, before the checkpoint is read."""
    out_dir = Path(out_dir)
    target = Path(os.path.realpath(out_dir))  # through a symlink to a directory, replace the directory
    _recover_interrupted_swap(target)
    check_export_target(out_dir)
    model, tokenizer = load_lightning_checkpoint(checkpoint)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(temp, ignore_errors=True)  # a leftover of a killed export with this pid
        save_hf_checkpoint(model, temp, dtype=dtype)
        if tokenizer is not None:
            eos = tokenizer.id_to_token(eos_id(tokenizer))  # the token the data module put between documents
            save_hf_tokenizer(tokenizer, temp, eos, model_max_length=model.config.max_seq_len)
        if target.exists():
            os.replace(target, old)
            try:
                os.replace(temp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, target)
    except Exception as error:
        if not _is_io_error(error):
            raise
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise InputError(f"could not write {out_dir}: {reason}; "
                         f"{'it is unchanged' if out_dir.exists() else 'nothing was written'}") from error
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out_dir


def _recover_interrupted_swap(target: Path) -> None:
    """Replacing a previous export takes two renames (target -> .NAME.old-PID, new -> target); a process killed
    between them leaves no target and the previous export under the hidden name. Put it back first."""
    if target.exists():
        return
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        os.replace(old, target)
        warnings.warn(f"{target}: restored the previous export from {old.name}, left by an export that was "
                      "killed while replacing it", stacklevel=3)
        return


def _is_io_error(error: Exception) -> bool:
    """An error of the file system (a full disk, no permission), as Python, safetensors or tokenizers report it:
    the Rust libraries raise their own error, or a plain Exception, with Rust's "(os error N)" in the message."""
    return isinstance(error, OSError) or re.search(r"\(os error \d+\)", str(error)) is not None


def check_export_target(out_dir: Path) -> None:
    """Raise an InputError unless `out_dir` is absent, an empty directory or a previous export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory: give a new directory to export to")
    if not out_dir.exists():
        parent = next(p for p in out_dir.absolute().parents if p.exists())
        if not parent.is_dir():
            raise InputError(f"cannot create {out_dir}: {parent} is not a directory")
        return
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir()
                     if p.is_dir() or not (p.name in EXPORT_FILES or _WEIGHT_SHARD.fullmatch(p.name)))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise InputError(f"{out_dir} is a directory that is not a previous export (it holds {listed}): give a new "
                         "or empty directory, or a previous export to replace")
