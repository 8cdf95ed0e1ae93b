"""Errors the user can act on end the command as one line naming the field, file (and line) or path, with exit status
2 and no traceback, and lose nothing already written: a model config the model cannot run with, malformed or
missing zero-shot evaluation rows, `moe export` onto a path that is neither new nor a previous export, and a disk
that fills up while a checkpoint is saved."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import cli
from moe import get_preset
from moe.data.tokenizer import train_tokenizer
from moe.model import Transformer
from moe.train.checkpoint_verify import verify_checkpoint

from .cli_runs import ROOT, refused, tiny_run_args
from .train.test_checkpoint_io import FullDisk


def nothing_trained(workdir: Path) -> bool:
    return not list(workdir.rglob("*.ckpt")) and not list(workdir.rglob("metrics.csv"))


# ------------------------------------------------------------------------------------------------ model config


def test_odd_head_dim_is_refused_naming_the_field_before_any_step(workdir, capsys):
    # It used to build the model and fail in RoPE in the sanity check: "The size of tensor a (7) must match ...".
    line = refused(capsys, ["fit", *tiny_run_args(workdir), "--model.config.head_dim", "7"])
    assert "--model.config.head_dim=7 must be even" in line and "ModelConfig" not in line
    assert nothing_trained(workdir)


# ------------------------------------------------------------------------------------------------ evaluation rows

PIQA_ROW = {"goal": "g", "sol1": "a", "sol2": "b", "label": 0}


@pytest.mark.parametrize("command,task,text,message", [
    ("fit", "piqa", json.dumps(PIQA_ROW) + '\n{"goal": "g", "sol1": "a", "label": 1}\n',
     "piqa/validation.jsonl:2: malformed piqa row (UndefinedError: 'sol2' is undefined)"),
    ("fit", "piqa", json.dumps(PIQA_ROW) + '\n\n{"goal": "g", "sol1": \n', "piqa/validation.jsonl:3: malformed JSON"),
    ("validate", "winogrande", '{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "3"}\n',
     "winogrande/validation.jsonl:1: malformed winogrande row (UndefinedError: 'dict object' has no attribute '3')"),
    ("fit", "boolq", None, "no data for task 'boolq' (validation split); looked for: {data}/validation.jsonl, {data}/boolq/validation.jsonl"),
    ("validate", "boolq", None, "no data for task 'boolq' (validation split); looked for: {data}/validation.jsonl"),
])
def test_bad_or_missing_evaluation_rows_end_in_one_line_before_any_step(workdir, capsys, command, task, text, message):
    data = workdir / "evaldata"
    data.mkdir()
    if text is not None:
        (data / task).mkdir()
        (data / task / "validation.jsonl").write_text(text)
    line = refused(capsys, [command, *tiny_run_args(workdir), "--config", str(ROOT / "configs/eval/zero-shot.yaml"),
                            "--eval.tasks", f"[{task}]", "--eval.data_dir", str(data)])
    assert line.startswith("error: ") and message.format(data=data) in line
    assert nothing_trained(workdir)  # refused when the run is set up, not at its first evaluation


# ------------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as LanguageModel writes it (architecture, weights, tokenizer), without a training run."""
    config = get_preset("tiny-moe", vocab_size=64, d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16,
                        n_experts=4, expert_backend="loop")
    torch.manual_seed(0)
    weights = {f"model.{k}": v for k, v in Transformer(config).state_dict().items()}
    tokenizer = train_tokenizer(["def value(self):\n    return count\n" * 20], 300)
    path = tmp_path_factory.mktemp("export") / "last.ckpt"
    torch.save({"model_config": dataclasses.asdict(config), "state_dict": weights,
                "tokenizer": tokenizer.to_str()}, path)
    return path


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_onto_a_file_is_refused_naming_it(workdir, capsys, checkpoint):
    out = workdir / "model.safetensors"
    out.write_bytes(b"not mine to delete")
    line = refused(capsys, ["export", str(checkpoint), str(out)])
    assert f"{out} exists and is not a directory" in line
    assert out.read_bytes() == b"not mine to delete"


def test_export_into_a_directory_that_is_not_an_export_is_refused(workdir, capsys, checkpoint):
    out = workdir / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    line = refused(capsys, ["export", str(checkpoint), str(out)])
    assert f"{out} is a directory that is not a previous export (it holds notes.txt)" in line
    assert contents(out) == {"notes.txt": b"mine", "config.json": b"{}"}


def test_export_replaces_a_previous_export_and_a_failed_one_keeps_it(workdir, capsys, checkpoint, monkeypatch):
    out = workdir / "hf"
    cli.main(["export", str(checkpoint), str(out)])
    first = contents(out)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= first.keys()

    import moe.hf

    real_save_file = moe.hf.save_file

    def save_onto_a_full_disk(tensors, filename, metadata=None):  # half a file, then safetensors' own error
        real_save_file(tensors, filename, metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(moe.hf, "save_file", save_onto_a_full_disk)
    line = refused(capsys, ["export", str(checkpoint), str(out), "--dtype", "bfloat16"])
    assert f"could not write {out}: " in line and "No space left on device" in line
    assert contents(out) == first
    assert sorted(os.listdir(workdir)) == sorted(["hf", "corpus", "tiny-callbacks.yaml"])  # no temporary left

    monkeypatch.undo()
    cli.main(["export", str(checkpoint), str(out), "--dtype", "bfloat16"])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert contents(out).keys() == first.keys()
    assert sorted(os.listdir(workdir)) == sorted(["hf", "corpus", "tiny-callbacks.yaml"])


def test_an_export_killed_between_its_two_renames_is_recovered_by_the_next(workdir, checkpoint):
    out = workdir / "hf"
    cli.main(["export", str(checkpoint), str(out)])
    first = contents(out)
    os.replace(out, workdir / ".hf.old-12345")  # the state a kill after the first rename of a replacement leaves
    with pytest.warns(UserWarning, match=r"restored the previous export from \.hf\.old-12345"):
        cli.main(["export", str(checkpoint), str(out), "--dtype", "bfloat16"])
    assert contents(out).keys() == first.keys()
    assert sorted(os.listdir(workdir)) == sorted(["hf", "corpus", "tiny-callbacks.yaml"])


# ------------------------------------------------------------------------------------------------ full disk


def test_a_full_disk_while_saving_a_checkpoint_ends_in_one_line_and_keeps_the_last_one(workdir, capsys,
                                                                                     monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        full = isinstance(obj, dict) and obj.get("global_step") == 6
        return real_save(obj, FullDisk(f, 4096) if full else f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    line = refused(capsys, ["fit", *tiny_run_args(workdir)])
    checkpoints = workdir / "runs/quickstart/version_0/checkpoints"
    assert line.startswith(f"error: could not save checkpoint {checkpoints / 'epoch=0-step=6.ckpt'}: "
                           "No space left on device (the checkpoint needs about ")
    monkeypatch.undo()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]  # no temporary
    verify_checkpoint(checkpoints / "last.ckpt")
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 3
