"""Exact resume through a real Lightning Trainer: a run resumed from a checkpoint sees the batches the
uninterrupted run saw, mid-epoch (also under gradient accumulation) and at an epoch boundary, and the DataModule
state is restored before iteration, without Lightning's warning that the loader cannot resume mid-epoch."""

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from moe.data import Source, TextDataModule
from moe.data.tokenizer import train_tokenizer


class RecordingModel(pl.LightningModule):
    """A tiny model whose only job is to record which samples each training step received."""

    def __init__(self, n_vocab: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(n_vocab, 4)
        self.seen: list[tuple[list[int], torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch["index"].tolist(), batch["input_ids"].clone()))
        return self.embedding(batch["input_ids"]).square().mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(data_kwargs, max_steps, root, ckpt_path=None, every=None, accumulate=1, **trainer_kwargs):
    data = TextDataModule(**data_kwargs)
    model = RecordingModel(data.n_vocab)
    callbacks = (
        [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}")] if every else []
    )
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # Validation mid-epoch and a sanity check: their batches must not count as consumed training batches.
        limit_val_batches=2,
        val_check_interval=3,
        num_sanity_val_steps=1,
        callbacks=callbacks,
        enable_checkpointing=bool(every),
        accumulate_grad_batches=accumulate,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model.seen, data


@pytest.mark.parametrize("where,accumulate", [("mid-epoch", 1), ("epoch boundary", 1), ("mid-epoch", 2)])
def test_trainer_resume_continues_the_stream(tmp_path, helpers, where, accumulate):
    path = helpers.write_jsonl(tmp_path / "d.jsonl", helpers.make_documents(30, seed=5))
    data_kwargs = {
        "sources": [Source(str(path))],
        "vocab_size": 300,
        "seq_len": 16,
        "batch_size": 4,
        "num_workers": 0,
        "val_fraction": 0.1,
        "cache_dir": str(tmp_path / "cache"),
    }
    per_epoch = TextDataModule(**data_kwargs)
    per_epoch.setup("fit")
    n = per_epoch.batches_per_epoch()
    steps_per_epoch = math.ceil(n / accumulate)  # an epoch's last, partial accumulation is a step too
    save_at = steps_per_epoch // 2 if where == "mid-epoch" else steps_per_epoch  # optimizer steps
    total = save_at + steps_per_epoch  # the resumed part crosses into the next epoch in every case

    def batches_in(steps):
        return steps // steps_per_epoch * n + steps % steps_per_epoch * accumulate

    full, _ = fit(data_kwargs, total, tmp_path / "full", every=save_at, accumulate=accumulate)
    assert [s[0] for s in full] == [list(range(4 * g, 4 * g + 4)) for g in range(batches_in(total))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, data = fit(data_kwargs, total, tmp_path / "resumed", accumulate=accumulate,
                            ckpt_path=tmp_path / "full" / f"step={save_at}.ckpt")

    assert len(resumed) == batches_in(total) - batches_in(save_at)
    for (index, inputs), (want_index, want_inputs) in zip(resumed, full[batches_in(save_at):]):
        assert index == want_index and torch.equal(inputs, want_inputs)
    assert data.consumed_batches == batches_in(total)
    # Lightning's "...your dataloader is not resumable..." would tell the user to distrust an exact resume.
    assert not [w for w in caught if "not resumable" in str(w.message)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_trainer_resume_continues_a_streaming_source_mid_stream(tmp_path, helpers, num_workers):
    # A stream of JSONL shards (read with datasets' streaming mode, tokenized in the loader's workers) mixed with a
    # cached source: the resumed run sees the uninterrupted run's batches, the stream's included.
    docs = helpers.make_documents(160, seed=6)
    shards = [str(helpers.write_jsonl(tmp_path / f"stream-{i}.jsonl", docs[i * 20 : (i + 1) * 20])) for i in range(8)]
    cached = helpers.write_jsonl(tmp_path / "cached.jsonl", helpers.make_documents(30, seed=5))
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer(docs[:40], 300).save(str(tokenizer))
    data_kwargs = {
        "sources": [Source("hf:json", data_files=shards, streaming=True, weight=3.0), Source(str(cached))],
        "tokenizer": str(tokenizer),
        "seq_len": 16,
        "batch_size": 4,
        "num_workers": num_workers,
        "val_fraction": 0.1,
        "cache_dir": str(tmp_path / "cache"),
    }
    # The stream has no length: the run is max_steps long, validated every 3 steps.
    full, _ = fit(data_kwargs, 9, tmp_path / "full", every=4, check_val_every_n_epoch=None)
    assert len(full) == 9 and [s[0] for s in full] == [list(range(4 * g, 4 * g + 4)) for g in range(9)]
    resumed, data = fit(data_kwargs, 9, tmp_path / "resumed", ckpt_path=tmp_path / "full" / "step=4.ckpt",
                        check_val_every_n_epoch=None)
    assert len(resumed) == 5 and data.consumed_batches == 9
    for (index, inputs), (want_index, want_inputs) in zip(resumed, full[4:]):
        assert index == want_index and torch.equal(inputs, want_inputs)
