"""Run by test_model_parallel.py as one of 2 CPU processes (gloo); the test sets the torch.distributed env vars.

Fits tiny MoE and dense models with our ModelParallelStrategy as FSDP2 data parallel (dp=2, tp=1) and tensor
parallel (dp=1, tp=2), some with activation checkpointing (test_model_parallel.CASES), and writes each rank's
per-step losses and full final weights to argv[1]/<run_name>.
"""

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.distributed.fsdp import FullyShardedDataParallel

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]  # tests/train, tests
from launch import full_state
from precision_worker import RecordClipping
from test_model_parallel import CASES, MODELS, MODES, MODULE_KWARGS, CPUFSDPStrategy, fit_kwargs, run_name, tiny_data

from moe.train import LanguageModel
from moe.train.strategies import ModelParallelStrategy


def instrument(module: LanguageModel) -> list[float]:
    """Seed right before the model is built, so every run starts from the same weights whatever the strategy
    drew from the generator before; return the list each micro-batch's loss is appended to."""
    losses, step, configure = [], module.training_step, module.configure_model

    def configure_model():
        torch.manual_seed(0)
        configure()

    def training_step(batch, batch_idx):
        out = step(batch, batch_idx)
        losses.append(out["loss"].item())
        return out

    module.configure_model, module.training_step = configure_model, training_step
    return losses


def main(out: Path) -> None:
    warnings.filterwarnings("ignore")
    for mode, kind, activation_checkpointing in CASES:
        dp, tp = MODES[mode]
        module = LanguageModel(MODELS[kind], activation_checkpointing=activation_checkpointing, **MODULE_KWARGS)
        losses, record = instrument(module), RecordClipping()
        if mode == "fsdp1":
            # bf16-mixed: FSDPStrategy's precision plugin, whose autocast is CUDA's, so on a CPU the arithmetic
            # stays float32 and comparable with the reference; the plugin is what refused to clip.
            t = pl.Trainer(devices=2, strategy=CPUFSDPStrategy(), callbacks=[record],
                           **{**fit_kwargs(), "precision": "bf16-mixed"})
        else:
            strategy = ModelParallelStrategy(tensor_parallel_size=tp)  # data_parallel_size 'auto' = 2 / tp
            t = pl.Trainer(devices=2, strategy=strategy, callbacks=[record], **fit_kwargs())
        t.fit(module, datamodule=tiny_data(batch_size=8 // dp))
        if mode == "fsdp1":
            with FullyShardedDataParallel.summon_full_params(t.strategy.model):
                weights = {name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                           for name, p in module.model.named_parameters()}
        else:
            assert t.strategy.device_mesh["data_parallel"].size() == dp
            weights = full_state(module.model)
        grad_norm = float(t.callback_metrics["train/grad_norm"])  # the last step's
        saved = {"losses": losses, "weights": weights, "grad_norm": grad_norm, "norms": (record.before, record.after)}
        torch.save(saved, out / run_name(mode, kind, activation_checkpointing, t.global_rank))

if __name__ == "__main__":
    main(Path(sys.argv[1]))
