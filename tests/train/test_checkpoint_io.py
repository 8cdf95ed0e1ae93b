"""Crash-safe and verified checkpoints (moe/train/checkpoint_io.py): a save killed half-way leaves the previous
last.ckpt whole and resumable, and a truncated or bit-flipped checkpoint is refused with an error naming the file,
through every reader (Trainer.fit(ckpt_path=...), read_checkpoint, load_lightning_checkpoint)."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from torch.utils.data import DataLoader

from moe import get_preset
from moe.errors import CheckpointNotSaved, InputError
from moe.train import LanguageModel
from moe.train.checkpoint import load_lightning_checkpoint, read_checkpoint
from moe.train.checkpoint_io import AtomicCheckpointIO, atomic_save, install_atomic_checkpoint_io
from moe.train.checkpoint_verify import CorruptCheckpointError, verify_checkpoint

TINY = get_preset("tiny-moe", vocab_size=64, d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16,
                  n_experts=4, expert_backend="loop")
TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0, limit_val_batches=0)


# ------------------------------------------------------------------------------------------------ crash mid-save
class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), batch_size=4)


class Crash(Exception):
    pass


class CrashWhileWritingLast(AtomicCheckpointIO):
    """Stops the save of last.ckpt once half its bytes are in the file torch.save writes: raising, or SIGKILL."""

    def __init__(self, kill: bool = False):
        super().__init__()
        self.kill = kill

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if Path(path).name != "last.ckpt":
            return super().save_checkpoint(checkpoint, path, storage_options)
        real_save = torch.save

        def save_half(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Crash("crashed while writing")

        torch.save = save_half
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = real_save


def fit(root: Path, max_steps: int, checkpoint_io: AtomicCheckpointIO, ckpt_path: str | None = None) -> pl.Trainer:
    """Fit `Linear`, saving epoch=0-step=N.ckpt and last.ckpt every 2 steps."""
    every_2 = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=2)
    trainer = pl.Trainer(default_root_dir=root, max_steps=max_steps, plugins=[checkpoint_io], callbacks=[every_2],
                         **TRAINER)
    trainer.fit(Linear(), ckpt_path=ckpt_path)
    return trainer


def assert_last_is_step_2_and_resumable(root: Path) -> None:
    folder = root / "checkpoints"
    last = folder / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    for checkpoint in folder.glob("*.ckpt"):  # no partial file passes for a checkpoint
        verify_checkpoint(checkpoint)
    trainer = fit(root, 6, AtomicCheckpointIO(), ckpt_path="last")
    assert trainer.global_step == 6 and torch.load(last, weights_only=True)["global_step"] == 6


def test_an_exception_while_writing_last_keeps_the_previous_one(tmp_path):
    fit(tmp_path, 2, AtomicCheckpointIO())
    with pytest.raises(Crash):
        fit(tmp_path, 4, CrashWhileWritingLast(), ckpt_path="last")
    # The half-written temporary file is gone too.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert_last_is_step_2_and_resumable(tmp_path)



class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def test_a_full_disk_names_the_checkpoint_and_the_cause_and_keeps_the_previous_one(tmp_path, monkeypatch):
    fit(tmp_path, 2, AtomicCheckpointIO())
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *args, **kwargs: real_save(obj, FullDisk(f, 700), *args, **kwargs))
    with pytest.raises(CheckpointNotSaved) as error:
        fit(tmp_path, 4, AtomicCheckpointIO(), ckpt_path="last")
    monkeypatch.undo()
    # torch.save reported it as "RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos 704 vs
    # 598", with the OSError only in its context.
    folder = tmp_path / "checkpoints"
    message = re.fullmatch(rf"could not save checkpoint {re.escape(str(folder / 'epoch=0-step=4.ckpt'))}: No space "
                           r"left on device \(the checkpoint needs about (\d+) bytes, [\d.]+ [kMG]B free there\); "
                           "nothing was written", str(error.value))
    assert message, str(error.value)
    # At least the weights, at most the whole file a save of the same run wrote (tensors are most of it).
    weights = sum(t.untyped_storage().nbytes() for t in Linear().state_dict().values())
    assert weights <= int(message[1]) < (folder / "last.ckpt").stat().st_size
    assert isinstance(error.value, InputError)  # the command line prints it as one line, without a traceback
    # No temporary file, and the previous checkpoints as they were.
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert_last_is_step_2_and_resumable(tmp_path)


def test_a_full_disk_while_replacing_last_says_the_previous_one_is_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, path)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *args, **kwargs: real_save(obj, FullDisk(f, 100), *args, **kwargs))
    with pytest.raises(CheckpointNotSaved, match=rf"could not save checkpoint {path}: No space left on device .*; "
                                                 "the previous last.ckpt is intact$"):
        atomic_save({"step": 2, "weights": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.ckpt"] and torch.load(path)["step"] == 1

def test_a_process_killed_while_writing_last_keeps_the_previous_one(tmp_path):
    fit(tmp_path, 2, AtomicCheckpointIO())
    killed = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # It died while writing: half a checkpoint lies in a hidden file that is neither *.ckpt nor taken for "last".
    (leftover,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert re.fullmatch(r"\.last\.ckpt\.tmp-\d+", leftover.name)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        verify_checkpoint(leftover)
    assert_last_is_step_2_and_resumable(tmp_path)


# ------------------------------------------------------------------------------------------------ corrupt files
def tiny_language_model() -> LanguageModel:
    return LanguageModel(TINY, warmup_steps=1)


def language_model_data() -> DataLoader:
    rows = torch.randint(0, 64, (32, 17), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row[:-1], "labels": row[1:]} for row in rows], batch_size=4)


@pytest.fixture(scope="module")
def lm_checkpoints(tmp_path_factory) -> Path:
    """The checkpoints folder of a 2-step LanguageModel run (last.ckpt at step 2)."""
    root = tmp_path_factory.mktemp("lm")
    trainer = pl.Trainer(default_root_dir=root, max_steps=2, **TRAINER,
                         callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)])
    trainer.fit(tiny_language_model(), train_dataloaders=language_model_data())
    # LanguageModel.setup installed it: Lightning's default would write last.ckpt without a rename into place.
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    return root / "checkpoints"


def largest_record(path: Path) -> tuple[str, int, int]:
    """Name and data byte range of the archive's largest record, read with zipfile and the APPNOTE header layout."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda r: r.compress_size)
    with open(path, "rb") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    start = record.header_offset + 30 + name_length + extra_length
    return record.filename, start, start + record.compress_size


def flip(offset):
    def damage(data: bytearray, record: tuple[str, int, int]) -> bytes:
        at = offset(len(data), *record[1:])
        data[at] ^= 0xFF
        return bytes(data)
    return damage


def cut(length):
    return lambda data, record: bytes(data[:length(len(data))])


# (damage, what the message must say); record: (name, start, end) of the largest record's data.
DAMAGES = {
    "flip first byte": (flip(lambda size, start, end: 0), "damaged: its first bytes"),
    "flip first tensor byte": (flip(lambda size, start, end: start), "CRC-32 mismatch in record '{record}'"),
    "flip mid tensor": (flip(lambda size, start, end: (start + end) // 2), "CRC-32 mismatch in record '{record}'"),
    "flip last tensor byte": (flip(lambda size, start, end: end - 1), "CRC-32 mismatch in record '{record}'"),
    "flip in directory": (flip(lambda size, start, end: size - 150), "damaged"),
    "flip near the end": (flip(lambda size, start, end: size - 6), "damaged: its end-of-archive record"),
    "empty": (cut(lambda size: 0), "truncated"),
    "3 bytes": (cut(lambda size: 3), "truncated"),
    "first kilobyte": (cut(lambda size: 1000), "truncated"),
    "half": (cut(lambda size: size // 2), "truncated"),
    "all but 1 byte": (cut(lambda size: size - 1), "truncated"),
    "not a checkpoint": (lambda data, record: b"step: 10\n" * 10, "not a checkpoint"),
}
READERS = {
    "read_checkpoint": read_checkpoint,
    "load_lightning_checkpoint": load_lightning_checkpoint,
    "AtomicCheckpointIO": AtomicCheckpointIO().load_checkpoint,
}


def damaged_copy(folder: Path, damage_name: str, tmp_path: Path) -> tuple[Path, str]:
    """A damaged copy of last.ckpt and the pattern its error message must match."""
    damage, says = DAMAGES[damage_name]
    record = largest_record(folder / "last.ckpt")
    path = tmp_path / "damaged.ckpt"
    path.write_bytes(damage(bytearray((folder / "last.ckpt").read_bytes()), record))
    advice = f"earlier checkpoint in {tmp_path}"
    return path, f"checkpoint {re.escape(str(path))} is .*{re.escape(says.format(record=record[0]))}.*{advice}"


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_refused_naming_the_file(lm_checkpoints, tmp_path, damage, reader):
    path, message = damaged_copy(lm_checkpoints, damage, tmp_path)
    with pytest.raises(CorruptCheckpointError, match=message):
        READERS[reader](path)


@pytest.mark.parametrize("damage", ["flip mid tensor", "half"])
def test_resuming_from_a_damaged_checkpoint_fails_instead_of_starting_over(lm_checkpoints, tmp_path, damage):
    path, message = damaged_copy(lm_checkpoints, damage, tmp_path)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, **TRAINER)
    with pytest.raises(CorruptCheckpointError, match=message):
        trainer.fit(tiny_language_model(), train_dataloaders=language_model_data(), ckpt_path=path)
    assert trainer.global_step == 0


def test_an_intact_checkpoint_loads_and_resumes(lm_checkpoints, tmp_path):
    last = lm_checkpoints / "last.ckpt"
    for reader in READERS.values():
        reader(last)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, **TRAINER)
    trainer.fit(tiny_language_model(), train_dataloaders=language_model_data(), ckpt_path=last)
    assert trainer.global_step == 3


def test_any_changed_byte_is_refused_or_changes_nothing(tmp_path):
    """Every byte of a small checkpoint inverted in turn: either verification refuses the file, or the byte is one
    torch's reader ignores (zip timestamps, padding, data descriptors) and the file loads exactly as saved."""
    saved = {"weight": torch.randn(2, 8, generator=torch.Generator().manual_seed(0)), "step": 3}
    torch.save(saved, tmp_path / "original.ckpt")
    original = (tmp_path / "original.ckpt").read_bytes()
    path = tmp_path / "changed.ckpt"
    refused = 0
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0xFF
        path.write_bytes(data)
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError:
            refused += 1
            continue
        loaded = torch.load(path, weights_only=True)
        assert loaded["step"] == 3 and torch.equal(loaded["weight"], saved["weight"]), offset
    assert refused > len(original) // 2


def test_a_checkpoint_saved_without_crcs_is_checked_for_structure_only(tmp_path):
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"weight": torch.ones(4)}, tmp_path / "no_crc.ckpt")
    finally:
        torch.serialization.set_crc32_options(before)
    with pytest.warns(UserWarning, match="without CRC-32s"):
        verify_checkpoint(tmp_path / "no_crc.ckpt")


# ------------------------------------------------------------------------------------------------ installation
class UserCheckpointIO(TorchCheckpointIO):
    pass


@pytest.mark.parametrize("plugin,expected", [
    (None, AtomicCheckpointIO),  # Lightning's default TorchCheckpointIO is replaced
    (UserCheckpointIO(), UserCheckpointIO),  # anything else is the user's choice
    (AsyncCheckpointIO(), AsyncCheckpointIO),
])
def test_install_replaces_only_the_default_checkpoint_io(plugin, expected):
    trainer = pl.Trainer(plugins=[plugin] if plugin else None, **TRAINER)
    install_atomic_checkpoint_io(trainer)
    assert type(trainer.strategy.checkpoint_io) is expected


def test_remote_paths_go_through_lightning():
    """fsspec URLs (here the in-memory file system) keep Lightning's upload, and are not verified."""
    checkpoint_io = AtomicCheckpointIO()
    checkpoint_io.save_checkpoint({"step": 7}, "memory://run/last.ckpt")
    assert checkpoint_io.load_checkpoint("memory://run/last.ckpt") == {"step": 7}


if __name__ == "__main__":
    # The process test_a_process_killed_while_writing_last_keeps_the_previous_one starts: resume the run in
    # argv[1] and be killed half-way through writing last.ckpt at step 4.
    fit(Path(sys.argv[1]), 4, CrashWhileWritingLast(kill=True), ckpt_path="last")
