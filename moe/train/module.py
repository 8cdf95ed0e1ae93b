"""The LightningModule: a causal language model, its objective and its train/validation/test/predict steps, with
the LLaMA recipe as defaults (Touvron et al. 2023).

Objective: next-token cross-entropy plus, for MoE models, the load-balancing and router z losses weighted by
the config's coefficients. The optimizer (optim.py: AdamW (0.9, 0.95), weight decay 0.1 on matrices only, or any
torch.optim class) and the schedule (schedule.py: linear warmup then cosine decay to 10% of the peak, or
warmup-stable-decay) are built here; clipping (clipping.py) is the Trainer's `gradient_clip_val`. The module logs
the losses of each optimizer step's global batch and the learning rate; everything else a run reports or guards
is a callback it registers by default (default_callbacks.py): the step guard, throughput and MFU, router losses,
expert load, the expert bias of auxiliary-loss-free balancing, random states on resume.

The model is built in `configure_model` (parallel.py applies sharding, recomputation and compile), so sharded
strategies can create it directly on the right devices; calling it twice is harmless.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from moe.config import ModelConfig
from moe.data.checks import check_vocabulary
from moe.generate import Sampling, complete
from moe.model import ModelOutput, Transformer
from moe.moe_layer import MoEStats
from moe.train.checkpoint import add_run_metadata, init_config, init_model
from moe.train.checkpoint_io import install_atomic_checkpoint_io
from moe.train.clipping import StepGradientNorm, clip_gradients
from moe.train.default_callbacks import check_default_names, default_callbacks
from moe.train.expert_bias import StepLoads
from moe.train.loss_tracking import EvalLoss, StepLosses
from moe.train.optim import build_optimizer, optimizer_class
from moe.train.parallel import parallelize, set_count_groups
from moe.train.resume import accept_checkpoint
from moe.train.run_paths import forget_rows_from
from moe.train.schedule import ScheduleLength, check_schedule_settings


class LanguageModel(pl.LightningModule):
    def __init__(
        self,
        config: ModelConfig,
        init_from: str | None = None,
        optimizer: str = "AdamW",
        optimizer_args: dict | None = None,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        eps: float = 1e-8,
        schedule: str = "cosine",
        warmup_steps: int = 2000,
        min_lr_ratio: float = 0.1,
        decay_fraction: float = 0.2,
        decay_shape: str = "1-sqrt",
        total_steps: int | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        sampling: Sampling | None = None,
        default_callbacks: list[str] | None = None,
    ):
        """
        Args:
            config: Model architecture: `moe.get_preset(name)` in Python, a configs/model/*.yaml file on the command line.
                Its vocab_size and max_seq_len are linked to the data module's tokenizer and sequence length.
                (A dict of its fields is accepted too: that is how checkpoints store it.)
            init_from: Start from these weights instead of a random initialisation: an HF model directory
                (config.json + safetensors) or a Lightning checkpoint of this module. The architecture then comes
                from that checkpoint; only the runtime fields of `config` (attention/expert backend, loss
                coefficients, capacity factor) apply.
            optimizer: The optimizer class: a torch.optim name (AdamW, SGD, Adafactor, ...) or an importable class
                path (package.module.Class). Torch's fused kernel is used where the class has one.
            optimizer_args: Further keyword arguments of the optimizer (e.g. {"momentum": 0.9} for SGD).
            lr: Peak learning rate.
            betas: Adam-family beta1 and beta2 (given to optimizers that take them).
            weight_decay: Weight decay, applied to matrices only (not norms, biases or embeddings).
            eps: Adam-family epsilon (given to optimizers that take it).
            schedule: 'cosine' (linear warmup, cosine decay to min_lr_ratio), 'wsd' (warmup, constant, final
                decay over decay_fraction of the run) or 'constant' (warmup, then constant).
            warmup_steps: Optimizer steps of linear warmup from 0 to the peak.
            min_lr_ratio: Learning rate at the end of the decay, as a fraction of the peak.
            decay_fraction: For 'wsd': fraction of the total steps spent decaying.
            decay_shape: For 'wsd': shape of the final decay, 'linear', 'cosine' or '1-sqrt'.
            total_steps: Optimizer steps the schedule spans; None takes the Trainer's max_steps (or the steps its
                max_epochs imply).
            activation_checkpointing: Recompute each block's activations in the backward pass to save memory.
            compile: torch.compile every transformer block.
            sampling: Generation settings for predict and for the sample printed after training.
            default_callbacks: Which of the callbacks in default_callbacks.DEFAULT_CALLBACKS (step guard, throughput and MFU, router
                losses, expert load, expert bias update, random state on resume) to register when `trainer.callbacks`
                holds none of their type; None registers them all, [] none. One given in `trainer.callbacks` (with
                its own settings) is used instead of the default.
        """
        super().__init__()
        # Checkpoints hold these two as plain dicts (see below), which is what load_from_checkpoint passes back.
        if isinstance(config, dict):
            config = ModelConfig(**config)
        if isinstance(sampling, dict):
            sampling = Sampling(**sampling)
        check_schedule_settings(schedule, lr, warmup_steps, min_lr_ratio, decay_fraction, decay_shape)
        optimizer_class(optimizer)  # an unknown optimizer fails here, naming it, not at the first step
        check_default_names(default_callbacks)
        self.save_hyperparameters()
        self.sampling = sampling or Sampling()
        self.init_from = init_from
        self.model_config = init_config(config, init_from)
        # The hyperparameters in a checkpoint rebuild this module around the checkpoint's own weights: the resolved
        # architecture and no init_from (the weights it named are in the state dict; the path may be gone), as plain
        # values so that torch.load(weights_only=True), the default, can read them. The logged hparams keep what
        # was asked for.
        self.hparams["config"] = dataclasses.asdict(self.model_config)
        self.hparams["init_from"] = None
        self.hparams["sampling"] = dataclasses.asdict(self.sampling)
        self.model: Transformer | None = None
        self.step_losses = StepLosses()  # this optimizer step's micro-batch objectives, judged by the step guard
        self.step_loads = StepLoads()  # ... and its expert loads, which move the experts' selection bias
        self.eval_loss = EvalLoss()
        self.step_grad_norm = StepGradientNorm()  # shared by the step guard and clipping
        self.schedule_length = ScheduleLength()

    # ------------------------------------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = init_model(self.model_config, self.init_from)
        # device_mesh is set by ModelParallelStrategy (FSDP2, optionally tensor parallel), None otherwise.
        parallelize(self.model, self.device_mesh, self.hparams.activation_checkpointing, self.hparams.compile)

    def forward(self, input_ids: torch.Tensor) -> ModelOutput:
        return self.model(input_ids)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        # A crash while saving must leave the previous checkpoint whole (see checkpoint_io).
        install_atomic_checkpoint_io(self.trainer)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "max_token_id"):
            # With init_from the vocabulary is the checkpoint's, not linked to the tokenizer's: it may be too small.
            origin = f" (from LanguageModel.init_from={self.init_from})" if self.init_from else ""
            check_vocabulary(datamodule, self.model_config.vocab_size, origin, stage)

    def on_fit_start(self) -> None:
        # The group over which MoE layers count their load-balancing fractions: parallelize gave it, unless the
        # model was built before the processes joined their group (configure_model called by hand).
        if any(getattr(m, "count_group", False) is None for m in self.model.modules()):
            set_count_groups(self.model, self.device_mesh)
        datamodule = getattr(self.trainer, "datamodule", None)
        log_dir = self.trainer.log_dir
        if datamodule is not None and hasattr(datamodule, "tokenizer") and log_dir and self.trainer.is_global_zero:
            # Beside the checkpoints (log_dir/checkpoints), so generation and eval can find the tokenizer.
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            datamodule.tokenizer.save(str(Path(log_dir) / "tokenizer.json"))

    def on_train_start(self) -> None:
        # An int val_check_interval counts optimizer steps, as max_steps, log_every_n_steps and checkpoint intervals
        # do: Lightning counts micro-batches (it would validate `accumulate_grad_batches` times too often).
        # val_check_batch is what its loop reads, set from the interval just before this hook.
        if self.trainer.ckpt_path:  # resumed: the steps after the checkpoint are logged again
            forget_rows_from(self.trainer, self.trainer.global_step)
        interval = self.trainer.val_check_interval
        if isinstance(interval, int) and self.trainer.accumulate_grad_batches > 1:
            self.trainer.val_check_batch = interval * self.trainer.accumulate_grad_batches

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Random states, the guard's window and tokens seen are the callbacks' state.
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        add_run_metadata(checkpoint, self.model_config, getattr(datamodule, "tokenizer", None))
        self.schedule_length.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        defaults = {name: p.default for name, p in inspect.signature(LanguageModel.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        accept_checkpoint(checkpoint, self.hparams, defaults, fitting)
        self.schedule_length.load(checkpoint)

    def configure_callbacks(self) -> list[pl.Callback]:
        """The default callbacks whose type `trainer.callbacks` does not hold: one given there (with its own
        settings) is used instead, and `default_callbacks` turns them off by name."""
        return default_callbacks(self.hparams.default_callbacks, self.trainer.callbacks)

    # ------------------------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self.model, hp.optimizer, hp.lr, hp.weight_decay, hp.betas, hp.eps,
                                    hp.optimizer_args)
        scheduler = self.schedule_length.scheduler(optimizer, hp, self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------------ training
    def _loss(self, out: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
        if out.loss is not None:  # the model was given the labels (chunked, no logits tensor)
            return out.loss
        return F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten())

    def objective(self, out: ModelOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training loss and its parts: cross-entropy, and for MoE models the weighted router losses."""
        ce = self._loss(out, labels)
        if not out.moe:
            return {"loss": ce, "ce": ce}
        config = self.model_config
        loss = ce + config.aux_loss_coef * out.aux_loss + config.z_loss_coef * out.z_loss
        return {"loss": loss, "ce": ce, "aux": out.aux_loss, "z": out.z_loss}

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        """The micro-batch's objective ("loss", what is differentiated) and, for the callbacks, its routing
        statistics ("moe": one MoEStats per MoE layer, detached)."""
        out = self.model(batch["input_ids"], labels=batch["labels"])
        parts = self.objective(out, batch["labels"])
        self.step_losses.add(parts["loss"], parts["ce"])
        # train/loss and train/total_loss are logged once per optimizer step, of its whole global batch
        # (on_before_optimizer_step); the *_micro_batch values are this process's micro-batch objective, the one
        # differentiated (its router fractions counted over the processes).
        self.log("train/loss_micro_batch", parts["ce"])
        if out.moe:
            self.log("train/aux_loss_micro_batch", parts["aux"])
            self.log("train/z_loss_micro_batch", parts["z"])
        moe = [MoEStats(*(t.detach() if isinstance(t, torch.Tensor) else t for t in stats)) for stats in out.moe]
        if self.model_config.router_bias_update_rate:
            # Read before the optimizer step, when the callbacks have not seen this micro-batch's outputs yet.
            self.step_loads.add(moe)
        return {"loss": parts["loss"], "moe": moe}

    def on_before_optimizer_step(self, optimizer) -> None:
        # Every micro-batch of the step has run: log the losses of its global batch, not process 0's last micro-batch.
        ce, total, _ = self.step_losses.reduce(self.trainer.strategy)  # the step guard's reduction, if it ran
        self.step_losses.clear()
        self.log("train/loss", ce, prog_bar=True)
        if self.model_config.is_moe:
            self.log("train/total_loss", total)
        self.log("train/lr", optimizer.param_groups[0]["lr"])  # the rate of this update, before the schedule steps

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's precision plugins refuse to clip for the fused AdamW (even under bf16-mixed) and under
        # FSDPStrategy; clipping.py clips for every strategy, with the norm the step guard already computed.
        norm = self.step_grad_norm.get(self.trainer, optimizer, self.parameters()) if gradient_clip_val else None
        clip_gradients(self.trainer.strategy, optimizer, gradient_clip_val, gradient_clip_algorithm, norm)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.step_grad_norm.forget()

    # ------------------------------------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict) -> None:
        loss = self._loss(self.model(batch["input_ids"], labels=batch["labels"]), batch["labels"])
        self.eval_loss.add(loss, batch["labels"].numel())

    def _log_eval_loss(self, split: str) -> None:
        loss = self.eval_loss.result(self.trainer.strategy)
        if loss is None:
            return
        # Already reduced over processes, so the mean sync_dist takes is the same value; asking for it keeps
        # Lightning from warning that epoch-level metrics are not synchronised.
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}/ppl", math.exp(min(loss, 100.0)), sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self.eval_loss.start(self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_loss("val")

    def on_test_epoch_start(self) -> None:
        self.eval_loss.start(self.device)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval_loss("test")

    # ------------------------------------------------------------------------------------------------ generation
    def complete(self, prompt_ids: torch.Tensor, eos_id: int | None) -> list[int]:
        """The tokens generated after a prompt with the module's sampling settings, up to (not including) the
        first EOS."""
        return complete(self.model, prompt_ids.to(self.device), self.sampling, eos_id)

    def on_predict_start(self) -> None:
        # The completions also go to predictions.jsonl in the run's folder (one file per process when several
        # share the prompts), written line by line so that an interrupted run keeps what it generated.
        self.predictions_file = None
        if self.trainer.log_dir:
            suffix = f".rank{self.global_rank}" if self.trainer.world_size > 1 else ""
            self.predictions_file = Path(self.trainer.log_dir) / f"predictions{suffix}.jsonl"
            self.predictions_file.parent.mkdir(parents=True, exist_ok=True)
            self.predictions_file.write_text("")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One prompt ({"prompt": str, "input_ids": (1, n)}) -> {"prompt", "completion"}, cut at the first EOS."""
        datamodule = self.trainer.datamodule
        completion = datamodule.decode(self.complete(batch["input_ids"], datamodule.eos_id))
        self.print(f"----- {batch['prompt']!r} -----\n{batch['prompt']}{completion}\n")
        record = {"prompt": batch["prompt"], "completion": completion}
        if self.predictions_file is not None:
            with self.predictions_file.open("a") as file:
                file.write(json.dumps(record) + "\n")
        return record

    def on_predict_end(self) -> None:
        if self.predictions_file is not None and self.trainer.is_global_zero:
            # print, not self.print: the progress bar that self.print writes through is closed by now.
            where = self.predictions_file if self.trainer.world_size == 1 else \
                self.predictions_file.parent / "predictions.rank*.jsonl"
            print(f"completions written to {where}", flush=True)
