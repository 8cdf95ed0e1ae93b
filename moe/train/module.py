"""The LightningModule: a causal language model trained with the LLaMA recipe (Touvron et al. 2023).

Objective: next-token cross-entropy plus, for MoE models, the load-balancing and router z losses weighted by
the config's coefficients. Optimiser: AdamW (0.9, 0.95), weight decay 0.1 on matrices only, linear warmup
then cosine decay to 10% of the peak (or warmup-stable-decay); gradient clipping is the Trainer's
`gradient_clip_val`. Logs loss, learning rate, gradient norm, tokens seen, tokens/s, TFLOP/s, MFU, the MoE
losses and per-layer expert load.

The model is built in `configure_model`, so sharded strategies can create it directly on the right devices;
calling it twice is harmless.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.checkpoint import checkpoint

from moe.config import ModelConfig
from moe.errors import InputError
from moe.losses import load_balancing_loss_from_sums
from moe.model import ModelOutput, Transformer
from moe.train.checkpoint import checkpoint_config, checkpoint_weights, read_checkpoint
from moe.train.checkpoint_io import install_atomic_checkpoint_io
from moe.train.clipping import clip_gradients, gradient_norm, unscale_gradients
from moe.train.guard import StepGuard
from moe.train.optim import fused_adamw_supported, param_groups
from moe.train.parallel import data_parallel_size
from moe.train.resume import check_resume, rng_states, set_rng_states
from moe.train.schedule import DECAY_SHAPES, SCHEDULES, lr_multiplier
from moe.train.throughput import ThroughputMeter, device_peak_tflops

# Config fields that change how a model runs or trains, not its weights: they may differ from the checkpoint a
# run is initialised from.
RUNTIME_FIELDS = ("attention_backend", "expert_backend", "aux_loss_coef", "z_loss_coef", "capacity_factor")


# The max_epochs a Trainer gets when given neither max_steps nor max_epochs (lightning.pytorch.loops.fit_loop).
LIGHTNING_DEFAULT_EPOCHS = 1000


@dataclass
class Sampling:
    """How `predict` and the end-of-training sample generate text."""

    max_new_tokens: int = 200
    """Tokens generated after each prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_k: int | None = 50
    """Sample only among the k most likely tokens; None keeps all."""
    top_p: float | None = 0.95
    """Nucleus sampling: the smallest set of tokens whose probability reaches p; None keeps all."""
    seed: int = 0
    """Seed of the sampling generator, so a sample is reproducible."""

    def __post_init__(self) -> None:
        # Written as "not (in range)" so that NaN is refused too.
        checks = (("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
                  ("temperature", self.temperature, math.isfinite(self.temperature) and self.temperature >= 0,
                   ">= 0 (0 is greedy)"),
                  ("top_k", self.top_k, self.top_k is None or self.top_k >= 1, ">= 1, or null to keep all tokens"),
                  ("top_p", self.top_p, self.top_p is None or 0 < self.top_p <= 1,
                   "in (0, 1], or null to keep all tokens"))
        for name, value, valid, expected in checks:
            if not valid:
                raise ValueError(f"--model.sampling.{name}={value} must be {expected}")


def checkpoint_blocks(model: Transformer) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    Replaces the block instances' forward rather than wrapping the modules, so parameter names (and therefore
    checkpoints and HF export) are unchanged.
    """
    for block in model.layers:
        block.forward = _Checkpointed(block.forward)


class _Checkpointed:
    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args):
        if not torch.is_grad_enabled():
            return self.forward(*args)
        return checkpoint(self.forward, *args, use_reentrant=False)


class LanguageModel(pl.LightningModule):
    def __init__(
        self,
        config: ModelConfig,
        init_from: str | None = None,
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
        peak_tflops: float | None = None,
        sampling: Sampling | None = None,
        on_nonfinite: str = "stop",
        spike_zscore: float | None = None,
        spike_window: int = 128,
        max_consecutive_skips: int = 8,
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
            lr: Peak learning rate.
            betas: AdamW beta1 and beta2.
            weight_decay: AdamW weight decay, applied to matrices only (not norms, biases or embeddings).
            eps: AdamW epsilon.
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
            peak_tflops: Peak TFLOP/s of one device for MFU; None looks the device up in a datasheet table (no MFU
                on CPU or unknown devices).
            sampling: Generation settings for predict and for the sample printed after training.
            on_nonfinite: What a non-finite loss or gradient norm does: 'stop' (raise before the update, naming the
                step) or 'skip' (drop that update and count it).
            spike_zscore: Drop an update whose loss is more than this many standard deviations above the mean of
                the last spike_window applied steps, and count it; None turns the spike guard off.
            spike_window: Applied steps the spike guard's mean and deviation are taken over.
            max_consecutive_skips: Stop training when this many updates in a row are dropped.
        """
        super().__init__()
        # Checkpoints hold these two as plain dicts (see below), which is what load_from_checkpoint passes back.
        if isinstance(config, dict):
            config = ModelConfig(**config)
        if isinstance(sampling, dict):
            sampling = Sampling(**sampling)
        if schedule not in SCHEDULES:
            raise ValueError(f"--model.schedule={schedule!r} is not one of {SCHEDULES}")
        if decay_shape not in DECAY_SHAPES:
            raise ValueError(f"--model.decay_shape={decay_shape!r} is not one of {DECAY_SHAPES}")
        for name, value in (("lr", lr), ("min_lr_ratio", min_lr_ratio), ("decay_fraction", decay_fraction)):
            if value < 0 or (name != "lr" and value > 1):
                raise ValueError(f"--model.{name}={value} is out of range")
        if warmup_steps < 0:
            raise ValueError(f"--model.warmup_steps={warmup_steps} must be >= 0")
        self.guard = StepGuard(on_nonfinite, spike_zscore, spike_window, min(32, spike_window),
                               max_consecutive_skips)
        self.save_hyperparameters()
        self.sampling = sampling or Sampling()
        self.init_from = init_from
        self.model_config = self._resolve_config(config, init_from)
        # The hyperparameters in a checkpoint rebuild this module around the checkpoint's own weights: the resolved
        # architecture and no init_from (the weights it named are in the state dict; the path may be gone), as plain
        # values so that torch.load(weights_only=True), the default, can read them. The logged hparams keep what
        # was asked for.
        self.hparams["config"] = dataclasses.asdict(self.model_config)
        self.hparams["init_from"] = None
        self.hparams["sampling"] = dataclasses.asdict(self.sampling)
        self.model: Transformer | None = None
        self._eval_sums: torch.Tensor | None = None
        self._meter: ThroughputMeter | None = None
        self._expert_tokens: torch.Tensor | None = None  # (L, E) assignments since the last report
        self._last_report_step = -1
        self._tokens_seen_before = 0  # tokens seen by the run this one resumes, from its checkpoint
        self._step_total_losses: list[torch.Tensor] = []  # this optimizer step's micro-batch objectives
        self._step_ce: list[torch.Tensor] = []  # ... and their cross-entropies
        self._grad_norm: float | None = None  # this step's, for clipping
        self._router_sums: torch.Tensor | None = None  # this optimizer step's routing sums (_router_sums_of)
        self._rng_to_restore: dict | None = None
        self._schedule_total: int | None = None  # optimizer steps the learning-rate schedule spans
        self._schedule_total_before: int | None = None  # ... in the run a resumed one continues
        self._resumed_step = 0

    # ------------------------------------------------------------------------------------------------ model
    @staticmethod
    def _resolve_config(config: ModelConfig, init_from: str | None) -> ModelConfig:
        if init_from is None:
            return config
        path = Path(init_from).expanduser()
        if path.is_dir():
            from moe.hf import read_hf_config
            from moe.hf_config import config_from_hf

            base = config_from_hf(read_hf_config(path))
        elif path.is_file():
            base = checkpoint_config(read_checkpoint(path))
        else:
            raise FileNotFoundError(f"--model.init_from={init_from}: no such HF model directory or checkpoint file")
        return base.replace(**{name: getattr(config, name) for name in RUNTIME_FIELDS})

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self._build_model()
        if self.device_mesh is not None:  # set by ModelParallelStrategy: FSDP2, optionally tensor parallel
            from moe.train.parallel import parallelize

            parallelize(self.model, self.device_mesh, self.hparams.activation_checkpointing)
        elif self.hparams.activation_checkpointing:
            checkpoint_blocks(self.model)
        if self.hparams.compile:
            for block in self.model.layers:
                block.compile()

    def _build_model(self) -> Transformer:
        init_from = self.init_from
        device = torch.get_default_device()
        if init_from is None:
            return Transformer(self.model_config)
        path = Path(init_from).expanduser()
        if path.is_dir():
            from moe.hf import load_hf_checkpoint

            runtime = {name: getattr(self.model_config, name) for name in RUNTIME_FIELDS}
            return load_hf_checkpoint(path, device=device, dtype=torch.float32, **runtime)
        model = Transformer(self.model_config)
        # Verified when __init__ read its config (_resolve_config): one read of a large file, not two.
        model.load_state_dict(checkpoint_weights(read_checkpoint(path, map_location=device, verify=False)))
        return model

    def forward(self, input_ids: torch.Tensor) -> ModelOutput:
        return self.model(input_ids)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        # A crash while saving must leave the previous checkpoint whole (see checkpoint_io).
        install_atomic_checkpoint_io(self.trainer)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "max_token_id"):
            return
        vocab = self.model_config.vocab_size
        # With init_from the vocabulary is the checkpoint's, not linked to the tokenizer's, so it may be too small.
        origin = f" (from --model.init_from={self.init_from})" if self.init_from else ""
        if datamodule.n_vocab > vocab:
            raise InputError(f"the tokenizer has {datamodule.n_vocab} token ids but the model's vocab_size is "
                             f"{vocab}{origin}, so ids past it have no embedding; use the tokenizer the model was "
                             f"trained with (--data.tokenizer) or a model with vocab_size >= {datamodule.n_vocab}")
        if stage == "predict":
            return  # prompts are encoded by the tokenizer just checked; no token arrays are loaded
        max_id = datamodule.max_token_id()
        if max_id >= vocab:
            raise InputError(f"the data holds token id {max_id}, beyond the model's vocab_size={vocab}{origin} "
                             "(ids must be < vocab_size); was the cache built with another tokenizer?")

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        log_dir = self.trainer.log_dir
        if datamodule is not None and hasattr(datamodule, "tokenizer") and log_dir and self.trainer.is_global_zero:
            # Beside the checkpoints (log_dir/checkpoints), so generation and eval can find the tokenizer.
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            datamodule.tokenizer.save(str(Path(log_dir) / "tokenizer.json"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The resolved architecture as plain values, so `init_from` and export need neither the CLI's config
        # files nor unpickling of our classes.
        checkpoint["model_config"] = dataclasses.asdict(self.model_config)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "tokenizer"):
            checkpoint["tokenizer"] = datamodule.tokenizer.to_str()
        checkpoint["tokens_seen"] = self._meter.tokens_seen if self._meter is not None else self._tokens_seen_before
        # What exact resume needs beyond Lightning's state (moe/train/resume.py).
        checkpoint["step_guard"] = self.guard.state_dict()
        checkpoint["rng_states"] = rng_states()
        checkpoint["seed"] = os.environ.get("PL_GLOBAL_SEED")
        checkpoint["schedule_total_steps"] = self._schedule_total

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            check_resume(checkpoint, self.hparams, os.environ.get("PL_GLOBAL_SEED"))
        # train/tokens_seen and the guard's window and counters continue across a resume.
        self._tokens_seen_before = int(checkpoint.get("tokens_seen", 0))
        if "step_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["step_guard"])
        self._schedule_total_before = checkpoint.get("schedule_total_steps")
        self._resumed_step = int(checkpoint.get("global_step", 0))
        # Put back right before the first step: validation and loader set-up in between must not see them.
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # ------------------------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        hp = self.hparams
        fused = fused_adamw_supported(self.model.parameters())
        optimizer = torch.optim.AdamW(
            param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
            **({"fused": True} if fused else {}),
        )
        total = self._total_steps()
        if hp.warmup_steps > total:
            raise InputError(f"--model.warmup_steps={hp.warmup_steps} exceeds the {total} optimizer steps of the "
                             "run; lower it or raise --trainer.max_steps")

        def multiplier_for(total_steps: int, step: int) -> float:
            return lr_multiplier(step, schedule=hp.schedule, warmup_steps=hp.warmup_steps, total_steps=total_steps,
                                 min_ratio=hp.min_lr_ratio, decay_fraction=hp.decay_fraction,
                                 decay_shape=hp.decay_shape)

        def multiplier(step: int) -> float:
            return multiplier_for(total, step)

        saved_total = self._schedule_total_before
        if saved_total is not None and saved_total != total:
            step = self._resumed_step
            before, after = hp.lr * multiplier_for(saved_total, step), hp.lr * multiplier(step)
            rank_zero_warn(f"the schedule now spans {total} optimizer steps instead of the checkpoint's {saved_total}, "
                           f"so the learning rate at step {step} changes from {before:.4g} to {after:.4g}; pass "
                           f"--model.total_steps {saved_total} to keep it")
        self._schedule_total = total
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        if self.hparams.total_steps is not None:
            return self.hparams.total_steps
        trainer, decays = self.trainer, self.hparams.schedule != "constant"
        if decays and trainer.max_steps < 0 and trainer.max_epochs == LIGHTNING_DEFAULT_EPOCHS:
            # Neither --trainer.max_steps nor --trainer.max_epochs given (or 1000 epochs asked for, which only
            # --model.total_steps can tell apart): Lightning stops after 1000 epochs, and a schedule spread over
            # them would stay near its peak for the whole of any real run.
            raise InputError(f"the {self.hparams.schedule} schedule needs the run's length: set --trainer.max_steps "
                             "(or --trainer.max_epochs, or --model.total_steps); without them Lightning runs for "
                             f"{LIGHTNING_DEFAULT_EPOCHS} epochs and the learning rate would not decay")
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise InputError("the schedule needs a length: set --trainer.max_steps or --model.total_steps")
        return int(steps)

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

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(batch["input_ids"], labels=batch["labels"])
        parts = self.objective(out, batch["labels"])
        self._step_total_losses.append(parts["loss"].detach())
        self._step_ce.append(parts["ce"].detach())
        # train/loss, train/total_loss, train/aux_loss and train/z_loss are logged once per optimizer step, of its
        # whole global batch (on_before_optimizer_step); the *_micro_batch values are this process's micro-batch
        # objective, the one differentiated (its router fractions counted over the processes).
        self.log("train/loss_micro_batch", parts["ce"])
        if out.moe:
            self.log("train/aux_loss_micro_batch", parts["aux"])
            self.log("train/z_loss_micro_batch", parts["z"])
            sums = self._router_sums_of(out)
            self._router_sums = sums if self._router_sums is None else self._router_sums + sums
            counts = out.tokens_per_expert.detach().float()
            self._expert_tokens = counts if self._expert_tokens is None else self._expert_tokens + counts
        # Tokens of the global batch: tensor-parallel processes share theirs, so count data-parallel ones only.
        self._throughput(batch["input_ids"]).update(batch["input_ids"].numel() * data_parallel_size(self.trainer))
        return parts["loss"]

    @staticmethod
    def _router_sums_of(out: ModelOutput) -> torch.Tensor:
        """This micro-batch's routing as one flat float64 tensor, summable over micro-batches and processes:
        (L, k, E) assignment counts, (L, E) probability sums, the token count and the token-weighted z-loss."""
        n_tokens = out.assignment_counts[0, 0].sum()  # each token makes exactly one first choice
        return torch.cat([out.assignment_counts.flatten(), out.probability_sum.flatten(), n_tokens[None],
                          (out.z_loss.detach() * n_tokens)[None]]).double()

    def _log_router_losses(self) -> None:
        """Log train/aux_loss and train/z_loss of the optimizer step's global batch (all micro-batches, all
        processes). The z-loss is a token mean, so that is the token-weighted mean of the micro-batch values. The
        load-balancing loss is not linear: it is recomputed from the summed assignment counts and probabilities,
        which makes it exactly the loss of the global batch in one forward pass, whatever the world size and
        gradient accumulation. (Its gradient, under accumulation, is that of each micro-batch's own loss with
        fractions counted over the processes: a micro-batch cannot see the later ones' routing.)"""
        if self._router_sums is None:
            return
        sums = self.trainer.strategy.reduce(self._router_sums, reduce_op="sum")
        self._router_sums = None
        config = self.model_config
        n_layers, k, n_experts = config.n_layers, config.top_k, config.n_experts  # every layer is a MoE layer
        counts, rest = sums[: n_layers * k * n_experts], sums[n_layers * k * n_experts:]
        probability_sum, (n_tokens, z_weighted) = rest[: n_layers * n_experts], rest[n_layers * n_experts:]
        aux = load_balancing_loss_from_sums(counts.view(n_layers, k, n_experts),
                                            probability_sum.view(n_layers, n_experts), n_tokens).mean()
        self.log("train/aux_loss", aux.float())
        self.log("train/z_loss", (z_weighted / n_tokens).float())

    def _throughput(self, input_ids: torch.Tensor) -> ThroughputMeter:
        if self._meter is None:
            peak = self.hparams.peak_tflops or device_peak_tflops(self.device, str(self.trainer.precision))
            flops = self.model_config.flops_per_token(input_ids.shape[1])
            self._meter = ThroughputMeter(flops, self.trainer.world_size, peak)
            self._meter.tokens_seen = self._tokens_seen_before
            self._meter.start()
        return self._meter

    # Validation inside fit is not training time: tokens/s, TFLOP/s and MFU leave it out of their window.
    def on_validation_start(self) -> None:
        if self._meter is not None:
            self._meter.pause()

    def on_validation_end(self) -> None:
        if self._meter is not None:
            self._meter.resume()

    def on_before_optimizer_step(self, optimizer) -> None:
        # Runs after the last micro-batch's backward and before clipping and the update: the one place to decide
        # whether the update happens, and to log what the optimizer step trains on.
        unscale_gradients(self.trainer.precision_plugin, optimizer)  # fp16 with a fused optimizer (clipping.py)
        grad_norm = gradient_norm(self.trainer.strategy, self.model.parameters())  # None under DeepSpeed
        zero = torch.zeros((), device=self.device)
        total = torch.stack(self._step_total_losses).mean() if self._step_total_losses else zero
        ce = torch.stack(self._step_ce).mean() if self._step_ce else zero
        self._step_total_losses, self._step_ce = [], []
        # Every process must reach the same verdict: decide on the mean over processes (a non-finite value on one
        # process makes the mean non-finite too). The means over micro-batches and processes are also the losses
        # of the global batch, which is what the step trains on: those are logged, not process 0's micro-batch.
        values = torch.stack([total.float(), ce.float(), zero.float() if grad_norm is None else grad_norm.float()])
        total, ce, norm = self.trainer.strategy.reduce(values, reduce_op="mean").tolist()
        norm = None if grad_norm is None else norm
        # fp16's gradient scaler skips overflowing steps itself and lowers its scale; that is not a divergence.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        verdict = self.guard.check(self.trainer.global_step, total, None if scaler is not None else norm)
        self._grad_norm = norm if verdict.apply else None
        if not verdict.apply:
            # With no gradients the optimizer leaves every parameter and its moments untouched; the step still
            # counts for the schedule and global_step, as a skipped batch does in PaLM and Megatron.
            optimizer.zero_grad(set_to_none=True)
            self.print(f"step {self.trainer.global_step}: update dropped ({verdict.reason}; "
                       f"total loss {total:.4g}" + ("" if norm is None else f", gradient norm {norm:.4g}") + ")")
        self.log("train/loss", ce, prog_bar=True)
        if self.model_config.is_moe:
            self.log("train/total_loss", total)
        self._log_router_losses()
        if norm is not None:
            self.log("train/grad_norm", norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        self.log("train/skipped_nonfinite", float(self.guard.skipped_nonfinite))
        self.log("train/skipped_spikes", float(self.guard.skipped_spikes))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's precision plugins refuse to clip for the fused AdamW (even under bf16-mixed) and under
        # FSDPStrategy; clipping.py clips for every strategy, with the norm the guard already computed.
        clip_gradients(self.trainer.strategy, optimizer, gradient_clip_val, gradient_clip_algorithm, self._grad_norm)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        step = self.trainer.global_step
        # global_step counts optimizer steps: under gradient accumulation it stays 0 through the first
        # micro-batches and repeats after each step, so report once, after a step, at the steps Lightning logs.
        if step == 0 or step == self._last_report_step or step % self.trainer.log_every_n_steps != 0:
            return
        self._last_report_step = step
        metrics = self._meter.report() if self._meter is not None else {}
        for name, value in metrics.items():
            self.log(f"perf/{name}", value, prog_bar=name == "tokens_per_s")
        if self._meter is not None:
            self.log("train/tokens_seen", torch.tensor(float(self._meter.tokens_seen), dtype=torch.float64))
        if self._expert_tokens is not None:
            # Summed over processes, tensor-parallel replicas (which route the same tokens) counted once.
            replicas = self.trainer.world_size // data_parallel_size(self.trainer)
            self._log_expert_load(self.trainer.strategy.reduce(self._expert_tokens, reduce_op="sum") / replicas)
            self._expert_tokens = None

    def _log_expert_load(self, tokens: torch.Tensor) -> None:
        """Per MoE layer: the busiest expert's load over the mean load (1 is perfect balance) and the number of
        experts that received no token since the last report."""
        imbalance = tokens.max(dim=1).values / tokens.mean(dim=1).clamp_min(1e-9)  # (L,)
        idle = (tokens == 0).sum(dim=1).float()  # (L,)
        for layer in range(tokens.shape[0]):
            self.log(f"experts/layer_{layer}/max_over_mean", imbalance[layer])
            self.log(f"experts/layer_{layer}/idle", idle[layer])
        self.log("experts/max_over_mean", imbalance.max())
        self.log("experts/idle", idle.sum())

    # ------------------------------------------------------------------------------------------------ evaluation
    # Token-weighted sums of the loss and token counts, reduced over processes at the end of the epoch.
    def _eval_start(self) -> None:
        self._eval_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def _eval_step(self, batch: dict) -> None:
        loss = self._loss(self.model(batch["input_ids"], labels=batch["labels"]), batch["labels"])
        n = batch["labels"].numel()
        self._eval_sums += torch.stack([loss.detach().double() * n, loss.new_tensor(n, dtype=torch.float64)])

    def _eval_end(self, split: str) -> None:
        total, count = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum").tolist()
        if count == 0:
            return
        loss = total / count
        # Already reduced over processes, so the mean sync_dist takes is the same value; asking for it keeps
        # Lightning from warning that epoch-level metrics are not synchronised.
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}/ppl", math.exp(min(loss, 100.0)), sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ------------------------------------------------------------------------------------------------ generation
    def generate_ids(self, prompt_ids: torch.Tensor, eos_id: int | None = None) -> torch.Tensor:
        from moe.generate import generate

        s = self.sampling
        generator = torch.Generator(device=self.device).manual_seed(s.seed)
        return generate(self.model, prompt_ids.to(self.device), s.max_new_tokens, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, eos_id=eos_id, generator=generator)

    def complete(self, prompt_ids: torch.Tensor, eos_id: int | None) -> list[int]:
        """The tokens generated after a (1, n) prompt, up to (not including) the first EOS."""
        new = self.generate_ids(prompt_ids.view(1, -1), eos_id=eos_id)[0, prompt_ids.numel():].tolist()
        return new[: new.index(eos_id)] if eos_id in new else new

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One prompt ({"prompt": str, "input_ids": (1, n)}) -> {"prompt", "completion"}, cut at the first EOS."""
        datamodule = self.trainer.datamodule
        completion = datamodule.decode(self.complete(batch["input_ids"], datamodule.eos_id))
        self.print(f"----- {batch['prompt']!r} -----\n{batch['prompt']}{completion}\n")
        return {"prompt": batch["prompt"], "completion": completion}
