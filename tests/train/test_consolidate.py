"""Sharded (torch.distributed.checkpoint) checkpoint directories: consolidated into one .ckpt that loads, resumes
and exports like the file a single-device fit writes (moe/train/checkpoint.py, moe/train/export.py).

The directory is written from one process (no process group) in the layout Lightning's strategies use: FSDPStrategy
puts the weights under "model", ModelParallelStrategy under "state_dict"; both store "optimizer_<i>" keyed by
parameter name and the rest in meta.pt. The oracle is the single-file checkpoint of a tiny CPU fit. The last test
uses a real directory, from two CPU processes under ModelParallelStrategy (FSDP2).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM

import cli
from moe.errors import InputError
from moe.model import Transformer
from moe.train.checkpoint import (
    checkpoint_config,
    consolidate_checkpoint,
    is_sharded_checkpoint,
    load_lightning_checkpoint,
    read_checkpoint,
)
from moe.train.export import export_to_hf
from moe.train.optim import param_groups

from ..cli_runs import ROOT, tiny_run_args


@pytest.fixture
def fitted(workdir):
    cli.main(["fit", *tiny_run_args(workdir)])
    return workdir / "runs/quickstart/version_0/checkpoints/last.ckpt"


def write_sharded(checkpoint: dict, folder, weights_key: str) -> None:
    """`checkpoint` saved as Lightning's FSDPStrategy(state_dict_type="sharded") ("model") or ModelParallelStrategy
    ("state_dict") saves it: weights and name-keyed optimizer states through DCP, everything else in meta.pt."""
    checkpoint = copy.deepcopy(checkpoint)
    model = Transformer(checkpoint_config(checkpoint))
    name_of = {id(p): f"model.{n}" for n, p in model.named_parameters()}
    names = [name_of[id(p)] for group in param_groups(model, 0.1) for p in group["params"]]
    state = {weights_key: checkpoint.pop("state_dict")}
    for i, optimizer in enumerate(checkpoint.pop("optimizer_states")):
        assert len(names) == sum(len(g["params"]) for g in optimizer["param_groups"])
        state[f"optimizer_{i}"] = {
            "state": {names[k]: v for k, v in optimizer["state"].items()},
            "param_groups": [{**g, "params": [names[k] for k in g["params"]]} for g in optimizer["param_groups"]],
        }
    dcp.save(state, checkpoint_id=folder)  # one process, no process group: a single shard
    torch.save(checkpoint, folder / "meta.pt")


@pytest.mark.parametrize("weights_key", ["model", "state_dict"])
def test_sharded_checkpoint_consolidates_resumes_and_exports(fitted, workdir, weights_key):
    original = torch.load(fitted, weights_only=False)
    sharded = workdir / "sharded.ckpt"
    write_sharded(original, sharded, weights_key)
    assert is_sharded_checkpoint(sharded) and not is_sharded_checkpoint(fitted)

    single = workdir / "consolidated.ckpt"
    cli.main(["consolidate", str(sharded), str(single)])  # consolidate_checkpoint, from the command line
    consolidated = read_checkpoint(single)  # also verifies the file's CRCs
    assert consolidated["state_dict"].keys() == original["state_dict"].keys()
    for key, tensor in original["state_dict"].items():
        torch.testing.assert_close(consolidated["state_dict"][key], tensor, rtol=0, atol=0)
    (ours,), (theirs,) = consolidated["optimizer_states"], original["optimizer_states"]
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for k, value in theirs["state"].items():
        for name in value:
            torch.testing.assert_close(ours["state"][k][name], value[name], rtol=0, atol=0)
    assert consolidated["global_step"] == original["global_step"] and consolidated["loops"] == original["loops"]
    assert consolidated["model_config"] == original["model_config"]

    # The directory itself loads as the file does.
    model, _ = load_lightning_checkpoint(sharded)
    reference, _ = load_lightning_checkpoint(fitted)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)

    # A single-device fit resumes from the consolidated file (optimizer state, loops, step counter restored).
    args = tiny_run_args(workdir)
    args[args.index("--trainer.max_steps") + 1] = "7"
    cli.main(["fit", *args, "--ckpt_path", str(single)])
    resumed = torch.load(workdir / "runs/quickstart/version_1/checkpoints/last.ckpt", weights_only=False)
    assert resumed["global_step"] == 7

    # Export straight from the directory: transformers computes our logits.
    out = export_to_hf(sharded, workdir / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_directory_that_is_no_sharded_checkpoint_is_refused(workdir):
    (workdir / "empty").mkdir()
    with pytest.raises(InputError, match="not a sharded checkpoint"):
        read_checkpoint(workdir / "empty")
    with pytest.raises(FileNotFoundError):
        consolidate_checkpoint(workdir / "missing", workdir / "out.ckpt")


def test_a_real_fsdp2_checkpoint_resumes_on_one_process(workdir):
    """Two CPU processes under configs/strategy/fsdp2.yaml write last.ckpt as a sharded directory; `moe consolidate`
    makes it one file, which resumes on a single process (same global batch: batch 8 instead of 2 x 4)."""
    args = tiny_run_args(workdir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_CACHE_DIR": str(workdir / "cache")}
    command = [sys.executable, str(ROOT / "cli.py"), "fit", *args, "--config", str(ROOT / "configs/strategy/fsdp2.yaml"),
               "--trainer.devices", "2"]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = workdir / "runs/quickstart/version_0/checkpoints/last.ckpt"
    assert is_sharded_checkpoint(sharded)

    single = workdir / "one.ckpt"
    cli.main(["consolidate", str(sharded), str(single)])
    from_file, _ = load_lightning_checkpoint(single)
    from_shards, _ = load_lightning_checkpoint(sharded)
    for name, tensor in from_shards.state_dict().items():
        assert torch.equal(from_file.state_dict()[name], tensor), name

    args[args.index("--trainer.max_steps") + 1] = "8"
    args[args.index("--data.batch_size") + 1] = "8"
    cli.main(["fit", *args, "--ckpt_path", str(single)])
    resumed = torch.load(workdir / "runs/quickstart/version_1/checkpoints/last.ckpt", weights_only=False)
    assert resumed["global_step"] == 8 and resumed["TextDataModule"]["consumed_batches"] == 8
