"""Run by test_ddp_eval.py: zero-shot evaluation through the Lightning callback in a 2-process DDP `validate` on
CPU (gloo), routing recorded. Rank 0 writes the callback's results and the forward passes each rank made to argv[1]
(JSON), and the callback its routing.jsonl beside it."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader

from eval.callback import ZeroShotEvaluation
from moe import get_preset
from moe.train import LanguageModel

TASKS, LIMIT = ["arc_easy", "winogrande", "piqa"], 9  # odd: the ranks get unequal shares


def build(evaldata: Path):
    """The tokenizer and the seeded model both the workers and the single-process oracle use."""
    texts = []
    for task in TASKS:
        with open(evaldata / task / "validation.jsonl") as f:
            texts += [line for _, line in zip(range(100), f)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    torch.manual_seed(0)
    module = LanguageModel(get_preset("tiny-moe", vocab_size=tokenizer.get_vocab_size(), n_layers=2))
    module.configure_model()
    return tokenizer, module


class EvalOnlyData(pl.LightningDataModule):
    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.eos_id = tokenizer, tokenizer.token_to_id("<|endoftext|>")

    def val_dataloader(self):
        # This rank's share, as moe.data's loader shards validation: the routing reference sums the shares.
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in reference_rows()[rank::world]],
                          batch_size=2)


def reference_rows() -> torch.Tensor:
    return torch.randint(0, 100, (4, 17), generator=torch.Generator().manual_seed(0))


def main(out: Path, evaldata: Path) -> None:
    tokenizer, module = build(evaldata)
    calls = []
    forward = module.model.forward
    module.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    callback = ZeroShotEvaluation(tasks=TASKS, limit=LIMIT, data_dir=str(evaldata), batch_tokens=512,
                                  output=str(out.parent / "zero_shot.jsonl"), routing=True)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.validate(module, datamodule=EvalOnlyData(tokenizer))
    counts = trainer.strategy.all_gather(torch.tensor(len(calls))).tolist()
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
        out.write_text(json.dumps({"results": callback.last_results, "forward_calls": counts, "logged": metrics}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
