"""Zero- and few-shot evaluation as a Lightning callback: in the training loop (every N optimizer steps and/or
at every validation) and in evaluation-only `validate` / `test` runs on a checkpoint or an HF model directory.

Scores come from `eval.evaluate` (lm-evaluation-harness 0.4 scoring) on the LightningModule's model with the
data module's tokenizer; every rank scores its share of the items and the metrics are reduced across ranks.
Logged as `eval/<name>/acc`, `eval/<name>/acc_norm` and their `_stderr` for every task and group; rank zero
prints a table and appends the results to a JSON-lines file. With `routing`, an MoE model's routing per task and
layer is recorded too (eval/routing.py).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as pl
import torch

from eval.harness import evaluate, task_items
from eval.report import append_results, format_table
from eval.routing import (
    RoutingRecorder,
    draw_routing_heatmap,
    moe_routers,
    record_batches,
    routing_rows,
    write_routing_jsonl,
)
from eval.tasks import resolve


def data_parallel_rank(trainer) -> tuple[int, int]:
    """This process's data-parallel rank and the data-parallel size: items are shared out over data-parallel
    replicas, and a model's tensor-parallel peers (same data-parallel rank) must run the same batches."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return kwargs.get("rank", trainer.global_rank), kwargs.get("num_replicas", trainer.world_size)


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
        num_fewshot: int | None = None,
        group_limit: int | None = None,
        routing: bool = False,
        routing_reference_batches: int = 8,
    ):
        """
        Args:
            tasks: What to score: shipped tasks (arc_easy, arc_challenge, boolq, hellaswag, openbookqa, piqa, sciq,
                winogrande, mmlu_<subject>[_continuation]), groups (olmo_core8, mmlu, mmlu_continuation, mmlu_stem,
                ...) or paths to task / group files in lm-eval's YAML format; empty disables.
            every_n_steps: Also evaluate every this many optimizer steps during fit; None only at validation.
            at_validation: Evaluate at the end of every validation (not the sanity check) and of `test`.
            limit: Score a fixed-seed subsample of at most this many items per task; None scores all.
            seed: Seed of that subsample, so every evaluation of a run scores the same items.
            data_dir: Folder with <task>/validation.jsonl; None reads $MOE_EVAL_DATA, else the HF Hub datasets
                lm-eval uses.
            batch_tokens: Tokens per scoring batch; None picks one for the device (4096 on CPU, 65536 on GPU).
            output: JSON-lines file the results are appended to; None writes zero_shot.jsonl in the run's log
                directory.
            num_fewshot: Solved examples before each item (MMLU is reported 5-shot); None uses each task file's
                num_fewshot, else 0.
            group_limit: Score a stratified fixed-seed subsample of this many items per group (split over its
                tasks by size, at least one each; e.g. 1000 of MMLU's 14042); None scores the per-task limit.
            routing: For an MoE model, also record per task and layer the experts' shares of the tokens, router
                entropy, top-1 repeats between consecutive tokens and the divergence from the routing of validation
                batches: appended to routing.jsonl beside the results and drawn in routing_<stage>_step<N>.png.
            routing_reference_batches: Validation batches per process routed as that reference (training data);
                0 leaves the reference and the divergence out.
        """
        self.tasks = list(tasks or [])
        try:
            resolve(self.tasks)  # an unknown task or a bad task file fails now, naming it
        except ValueError as error:
            raise type(error)(f"ZeroShotEvaluation.tasks: {error}") from None
        for name, value in (("every_n_steps", every_n_steps), ("limit", limit), ("batch_tokens", batch_tokens),
                            ("group_limit", group_limit)):
            if value is not None and value <= 0:
                raise ValueError(f"ZeroShotEvaluation.{name}={value} must be positive or None")
        if num_fewshot is not None and num_fewshot < 0:
            raise ValueError(f"ZeroShotEvaluation.num_fewshot={num_fewshot} must be 0 or more, or None")
        self.num_fewshot, self.group_limit = num_fewshot, group_limit
        self.every_n_steps, self.at_validation = every_n_steps, at_validation
        self.limit, self.seed, self.batch_tokens, self.output = limit, seed, batch_tokens, output
        self.data_dir = data_dir
        if routing_reference_batches < 0:
            raise ValueError(f"ZeroShotEvaluation.routing_reference_batches={routing_reference_batches} must be 0 "
                             "or more")
        self.routing, self.routing_reference_batches = routing, routing_reference_batches
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
                       eos_id=datamodule.eos_id, num_fewshot=self.num_fewshot, group_limit=self.group_limit)

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
        rank, world_size = data_parallel_rank(trainer)
        was_training = model.training
        model.eval()
        recorder = RoutingRecorder(model) if self.routing and moe_routers(model) else None
        try:
            with torch.inference_mode(), recorder or nullcontext():
                results = evaluate(
                    model, datamodule.tokenizer, tasks=self.tasks,
                    data_dir=self._data_dir(), limit=self.limit, seed=self.seed,
                    batch_tokens=self.batch_tokens, eos_id=datamodule.eos_id, rank=rank, world_size=world_size,
                    replicas=trainer.world_size // world_size, num_fewshot=self.num_fewshot,
                    group_limit=self.group_limit,
                    routing=recorder, progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
                )
        finally:
            model.train(was_training)
        self.last_results = results
        if recorder is not None:
            self._report_routing(trainer, model, recorder, stage, list(results))
        for task, metrics in results.items():
            for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
                if metric in metrics:
                    # Already reduced over ranks (every rank holds the same value); sync_dist only keeps
                    # Lightning from warning about an unsynchronised epoch-level metric.
                    pl_module.log(f"eval/{task}/{metric}", metrics[metric], sync_dist=True)
        if trainer.is_global_zero:
            # validate/test on a checkpoint do not restore the step counter; name the checkpoint instead.
            where = f"step {trainer.global_step}" if stage == "train" or not trainer.ckpt_path else trainer.ckpt_path
            shots = f", {self.num_fewshot}-shot" if self.num_fewshot else ""
            print(f"\nzero-shot ({stage}, {where}{shots}):\n{format_table(results)}\n", flush=True)
            append_results(self._output_path(trainer), {"stage": stage, "step": trainer.global_step,
                                                         "checkpoint": trainer.ckpt_path,
                                                         "num_fewshot": self.num_fewshot, "results": results})
        return results

    def _report_routing(self, trainer, model, recorder: RoutingRecorder, stage: str, order: list[str]) -> None:
        """Sum the routing over processes, route every process's first validation batches as the reference, and
        (rank zero) append routing.jsonl and draw routing_<stage>_step<N>.png beside the results."""
        replicas = trainer.world_size // data_parallel_rank(trainer)[1]  # tensor-parallel peers see the same tokens
        sums = recorder.sums().summed_over_processes().divided(replicas)
        sums = sums.select([task for task in order if task in sums.tasks])
        loader = trainer.datamodule.val_dataloader() if self.routing_reference_batches else []
        batches = (batch["input_ids"] if isinstance(batch, dict) else batch for batch in loader)
        reference = record_batches(model, batches, self.routing_reference_batches).summed_over_processes()
        reference = reference.divided(replicas)
        reference = reference if reference.tasks else None  # no validation data
        if trainer.is_global_zero:
            folder = self._output_path(trainer).parent
            write_routing_jsonl(folder / "routing.jsonl", {"stage": stage, "step": trainer.global_step,
                                                           "checkpoint": trainer.ckpt_path,
                                                           "rows": routing_rows(sums, reference)})
            draw_routing_heatmap(folder / f"routing_{stage}_step{trainer.global_step}.png", sums, reference)

    def _data_dir(self) -> str | None:
        return self.data_dir or os.environ.get("MOE_EVAL_DATA")

    def _output_path(self, trainer) -> Path:
        if self.output:
            return Path(self.output)
        return Path(trainer.log_dir or trainer.default_root_dir) / "zero_shot.jsonl"
