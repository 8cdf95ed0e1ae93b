"""Run by test_ddp.py: a 2-process DDP fit on CPU; rank 0 writes what it observed to the JSON file named by argv[1]."""

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from test_module import TINY, PatternData, trainer

from moe.train import LanguageModel
from moe.train.routing_metrics import ExpertLoadMonitor


class Record(ExpertLoadMonitor):
    """The default expert-load monitor, keeping the total of each report."""

    def __init__(self):
        super().__init__()
        self.expert_tokens = []

    def log_load(self, pl_module, tokens):
        self.expert_tokens.append(tokens.sum().item())
        super().log_load(pl_module, tokens)


def main(out: Path) -> None:
    warnings.simplefilter("always")
    torch.manual_seed(0)
    module = LanguageModel(TINY, warmup_steps=1)
    record = Record()
    data = PatternData(batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        t = trainer(max_steps=4, devices=2, strategy="ddp", log_every_n_steps=2, limit_val_batches=2,
                    val_check_interval=4, check_val_every_n_epoch=None, callbacks=[record])
        t.fit(module, datamodule=data)
    if not t.is_global_zero:
        return
    module.eval()
    with torch.no_grad():  # the whole validation set (16 rows; 2 batches of 4 on each process) in one process
        rows = data.tokens[:16]
        full = F.cross_entropy(module.model(rows[:, :-1]).logits.flatten(0, 1), rows[:, 1:].flatten())
    out.write_text(json.dumps({
        "val_loss": float(t.callback_metrics["val/loss"]), "full_val_loss": float(full),
        "tokens_seen": float(t.callback_metrics["train/tokens_seen"]), "expert_tokens": record.expert_tokens,
        "warnings": [str(w.message) for w in caught],
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
