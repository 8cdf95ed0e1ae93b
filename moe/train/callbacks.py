"""Callbacks that report on a run: a generated sample and a closing summary of the validation loss.

Both print on global rank zero only and read the tokenizer from the attached data module.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch


class GenerateSample(pl.Callback):
    """Print what the model writes after each of the data module's prompts, at the end of training (and every
    `every_n_steps` optimizer steps if set), with the module's sampling settings."""

    def __init__(self, every_n_steps: int | None = None, max_prompts: int = 1):
        """
        Args:
            every_n_steps: Also print a sample every this many optimizer steps; None prints only at the end.
            max_prompts: How many of the data module's prompts to continue.
        """
        self.every_n_steps, self.max_prompts = every_n_steps, max_prompts
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # global_step counts optimizer steps, so under gradient accumulation it repeats across micro-batches (and
        # is 0 before the first one); the last step's sample is the one on_train_end prints.
        if (self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step and step > 0
                and step != trainer.max_steps):
            self._last_step = step
            self._print(trainer, pl_module, f"sample at step {step}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._print(trainer, pl_module, f"sample after {trainer.global_step} steps")

    @staticmethod
    def samples(trainer, pl_module, max_prompts: int) -> list[tuple[str, str]]:
        data = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        try:
            out = []
            for prompt in data.prompts[:max_prompts]:
                ids = torch.tensor(data.encode(prompt), dtype=torch.long)
                out.append((prompt, data.decode(pl_module.complete(ids, data.eos_id))))
            return out
        finally:
            pl_module.train(was_training)

    def _print(self, trainer, pl_module, title: str) -> None:
        if trainer.datamodule is None or not hasattr(trainer.datamodule, "prompts"):
            return
        samples = self.samples(trainer, pl_module, self.max_prompts)  # every rank: sharded models need all
        if trainer.is_global_zero:
            for prompt, completion in samples:
                print(f"\n----- {title} -----\n{prompt}{completion}\n" + "-" * (len(title) + 12), flush=True)


class ValidationSummary(pl.Callback):
    """At the end of fit, print the last validation loss next to the unigram baseline of the same data, the
    loss a model that ignores context would reach, and where the checkpoints are."""

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val/loss")
        data = trainer.datamodule
        lines = []
        if val is not None:
            lines.append(f"validation loss {float(val):.3f} nats (perplexity {math.exp(float(val)):.1f})")
            if data is not None and hasattr(data, "unigram_baseline"):
                baseline = data.unigram_baseline()
                gain = baseline - float(val)
                verdict = f"{gain:.3f} nats better than" if gain >= 0 else f"{-gain:.3f} nats worse than"
                lines.append(f"unigram baseline {baseline:.3f} nats (perplexity {math.exp(baseline):.1f}): "
                             f"{verdict} context-free")
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.dirpath:
            lines.append(f"checkpoints in {ckpt.dirpath}" + (f" (last: {ckpt.last_model_path})"
                                                             if ckpt.last_model_path else ""))
        if lines:
            print("\n" + "\n".join(lines), flush=True)
