"""expert_load.jsonl, the whole expert load that ExpertLoadMonitor writes at each log step (the format `moe plot`
reads): against a recount of the router's own top-k choices on the same batches, absent without a run folder, and
continued by a resumed run."""

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import cli
from moe.moe_layer import MoELayer
from moe.train import LanguageModel
from moe.train.loggers import load_heatmap

from ..cli_runs import tiny_run_args
from .test_module import TINY, PatternData, trainer


class RecountRouting(pl.Callback):
    """The oracle: each training forward's top-k choices per MoE layer, recounted from the router's gate logits (with
    no selection bias the top-k of the logits is that of the probabilities)."""

    def __init__(self):
        self.counts: list[list[torch.Tensor]] = []  # per training forward: (E,) per MoE layer

    def on_train_start(self, trainer, pl_module):
        layers = [m for m in pl_module.model.modules() if isinstance(m, MoELayer)]
        for index, layer in enumerate(layers):
            layer.router.gate.register_forward_hook(self.hook(index, len(layers), layer.top_k, layer.n_experts))

    def hook(self, index, n_layers, top_k, n_experts):
        def count(gate, inputs, logits):
            if not gate.training:  # validation
                return
            if index == 0:
                self.counts.append([None] * n_layers)
            chosen = logits.detach().topk(top_k, dim=-1).indices  # (N, k)
            self.counts[-1][index] = torch.bincount(chosen.flatten(), minlength=n_experts).double()
        return count


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_line_is_the_fraction_of_each_layers_assignments_per_expert(tmp_path):
    recount = RecountRouting()
    t = trainer(max_steps=3, limit_val_batches=0, log_every_n_steps=1, logger=CSVLogger(tmp_path), callbacks=[recount])
    t.fit(LanguageModel(TINY, warmup_steps=1), datamodule=PatternData())
    lines = rows(tmp_path / "lightning_logs" / "version_0" / "expert_load.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3] and len(recount.counts) == 3  # one batch per step
    for line, counts in zip(lines, recount.counts):
        assert set(line) == {"step", "layers", "load"}
        assert line["layers"] == list(TINY.moe_layer_indices())
        expected = torch.stack(counts) / counts[0].sum()  # (L, E): each token makes top_k assignments
        torch.testing.assert_close(torch.tensor(line["load"], dtype=torch.float64), expected, atol=1e-6, rtol=0)
        assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in line["load"])


def test_no_file_without_a_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where Trainer.log_dir falls back to without a logger
    t = trainer(max_steps=2, limit_val_batches=0, log_every_n_steps=1)
    t.fit(LanguageModel(TINY, warmup_steps=1), datamodule=PatternData())
    assert not list(tmp_path.rglob("expert_load.jsonl"))


def test_a_resumed_run_appends_to_the_file(workdir):
    args = [*tiny_run_args(workdir), "--model.total_steps", "6"]  # the schedule of the whole 6 steps
    cli.main(["fit", *args, "--trainer.max_steps", "3"])  # logs step 2, checkpoints step 3
    run = workdir / "runs" / "quickstart" / "version_0"
    cli.main(["fit", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
              "--trainer.logger.init_args.version", "0"])  # into the same folder; logs steps 4 and 6
    lines = rows(run / "expert_load.jsonl")
    assert [line["step"] for line in lines] == [2, 4, 6]
    assert all(line["layers"] == [0, 1] and len(line["load"]) == 2 for line in lines)


def test_the_heatmap_shows_the_mean_load_as_mid_grey():
    load = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.5, 0.125, 0.375]])
    image = load_heatmap(load)
    assert image.shape == (2 * 8, 4 * 8) and image.dtype.name == "uint8"
    # Cell (layer, expert) at its top-left pixel: 1/E -> 128 (mid-grey), idle -> 0, 2/E or more -> 255.
    assert image[::8, ::8].tolist() == [[128, 128, 128, 128], [0, 255, 64, 191]]
