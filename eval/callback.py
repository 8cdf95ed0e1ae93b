"""Zero-shot evaluation as a Lightning callback: in the training loop (every N optimizer steps and/or at every
validation) and in evaluation-only `validate` / `test` runs on a checkpoint or an HF model directory.

Scores come from `eval.evaluate` (lm-evaluation-harness 0.4 scoring) on the LightningModule's model with the
data module's tokenizer; every rank scores its share of the items and the metrics are reduced across ranks.
Logged as `eval/<task>/acc` and `eval/<task>/acc_norm`; rank zero prints a table and appends the results to a
JSON-lines file.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch

from eval.harness import evaluate, task_items
from eval.report import append_results, format_table
from eval.tasks import get_task


class ZeroShotEvaluation(pl.Callback):
    def __init__(
        self,
        tasks: list[str] | None = None,
        every_n_steps: int | None = None,
        at_validation: bool = True,
        limit: int | None = None,
        seed: int = 1234,
        data_dir: str | None = None,
        batch_tokens: int | None = None,
        output: str | None = None,
    ):
        """
        Args:
            tasks: Tasks to score (arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq); empty disables.
            every_n_steps: Also evaluate every this many optimizer steps during fit; None only at validation.
            at_validation: Evaluate at the end of every validation (not the sanity check) and of `test`.
            limit: Score a fixed-seed subsample of at most this many items per task; None scores all.
            seed: Seed of that subsample, so every evaluation of a run scores the same items.
            data_dir: Folder with <task>/validation.jsonl; None reads $MOE_EVAL_DATA, else the HF Hub datasets
                lm-eval uses.
            batch_tokens: Tokens per scoring batch; None picks one for the device (4096 on CPU, 65536 on GPU).
            output: JSON-lines file the results are appended to; None writes zero_shot.jsonl in the run's log
                directory.
        """
        self.tasks = list(tasks or [])
        for name in self.tasks:
            try:
                get_task(name)  # an unknown task fails now, listing the available ones
            except ValueError as error:
                raise ValueError(f"ZeroShotEvaluation.tasks: {error}") from None
        for name, value in (("every_n_steps", every_n_steps), ("limit", limit), ("batch_tokens", batch_tokens)):
            if value is not None and value <= 0:
                raise ValueError(f"ZeroShotEvaluation.{name}={value} must be positive or None")
        self.every_n_steps, self.at_validation = every_n_steps, at_validation
        self.limit, self.seed, self.batch_tokens, self.output = limit, seed, batch_tokens, output
        self.data_dir = data_dir
        self.last_results: dict[str, dict] | None = None
        self._last_step = -1

    # ---------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        # Read, check and tokenize the tasks' rows now (cached for the evaluations), so that a malformed row or a
        # missing file stops the run before its first step, not at its first evaluation with the steps since the
        # last checkpoint lost. The data module is set up before the callbacks, so its tokenizer exists.
        will_run = (self.every_n_steps or self.at_validation) if stage == "fit" else \
            (self.at_validation and stage in ("validate", "test"))
        datamodule = trainer.datamodule
        if self.tasks and will_run and datamodule is not None and hasattr(datamodule, "tokenizer"):
            task_items(datamodule.tokenizer, self.tasks, data_dir=self._data_dir(), limit=self.limit, seed=self.seed,
                       eos_id=datamodule.eos_id)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # global_step counts optimizer steps, so under gradient accumulation it repeats across micro-batches.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.run(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.at_validation and not trainer.sanity_checking:
            self.run(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.at_validation:
            self.run(trainer, pl_module, "test")

    # ---------------------------------------------------------------------------------------------- work
    def run(self, trainer, pl_module, stage: str) -> dict[str, dict] | None:
        if not self.tasks:
            return None
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "tokenizer"):
            raise RuntimeError("ZeroShotEvaluation needs a data module with a tokenizer (moe.data.TextDataModule)")
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                results = evaluate(
                    model, datamodule.tokenizer, tasks=self.tasks,
                    data_dir=self._data_dir(), limit=self.limit, seed=self.seed,
                    batch_tokens=self.batch_tokens, eos_id=datamodule.eos_id, rank=trainer.global_rank,
                    world_size=trainer.world_size,
                )
        finally:
            model.train(was_training)
        self.last_results = results
        for task, metrics in results.items():
            for metric in ("acc", "acc_norm"):
                if metric in metrics:
                    # Already reduced over ranks (every rank holds the same value); sync_dist only keeps
                    # Lightning from warning about an unsynchronised epoch-level metric.
                    pl_module.log(f"eval/{task}/{metric}", metrics[metric], sync_dist=True)
        if trainer.is_global_zero:
            # validate/test on a checkpoint do not restore the step counter; name the checkpoint instead.
            where = f"step {trainer.global_step}" if stage == "train" or not trainer.ckpt_path else trainer.ckpt_path
            print(f"\nzero-shot ({stage}, {where}):\n{format_table(results)}\n", flush=True)
            append_results(self._output_path(trainer), {"stage": stage, "step": trainer.global_step,
                                                         "checkpoint": trainer.ckpt_path, "results": results})
        return results

    def _data_dir(self) -> str | None:
        return self.data_dir or os.environ.get("MOE_EVAL_DATA")

    def _output_path(self, trainer) -> Path:
        if self.output:
            return Path(self.output)
        return Path(trainer.log_dir or trainer.default_root_dir) / "zero_shot.jsonl"
