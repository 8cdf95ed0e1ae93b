"""The streaming training stream (moe/data/streaming.py) on local JSONL / Parquet shards: every document once per
epoch over 2 ranks x 2 workers, packing as packing.py packs, mixing exactly as the schedule says (and cached
sources served as MixtureDataset serves them), exact resume in-process, across ranks and through a real Trainer."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from moe.data.datasets import MixtureDataset, TokenFile
from moe.data.mixture import MixtureSchedule
from moe.data.packing import n_windows, window
from moe.data.parallel_tokenize import encode_with_eos
from moe.data.sampler import GlobalBatchSampler
from moe.data.sources import DataError, Source
from moe.data.streaming import PLACEHOLDER_WINDOWS, shard_strategy
from moe.data.streaming_loader import streaming_train_loader
from moe.data.tokenizer import eos_id, train_tokenizer
from moe.errors import IncompatibleResume

SEQ_LEN, BATCH = 16, 4
CACHED_LOW = 1000  # ids of the cached test source start here, above the tokenizer's: a sample tells its source


def documents(n: int, seed: int = 0) -> list[str]:
    """Short, distinct documents (each names its number), of varied length."""
    rng = np.random.default_rng(seed)
    words = ["the", "of", "and", "def", "return", "class", "import", "data", "moe", "expert"]
    return [f"doc {i}: " + " ".join(rng.choice(words, size=rng.integers(2, 25))) + "." for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(documents(300), 300)


def write_shards(folder: Path, docs: list[str], n_shards: int, fmt: str = "jsonl") -> list[str]:
    """Documents dealt round robin into `n_shards` files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = folder / f"shard{s}.{fmt}"
        texts = docs[s::n_shards]
        if fmt == "jsonl":
            path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
        else:
            pq.write_table(pa.table({"text": texts}), path)
        paths.append(str(path))
    return paths


def stream_source(paths: list[str], fmt: str = "jsonl", **kwargs) -> Source:
    return Source("hf:json" if fmt == "jsonl" else "hf:parquet", data_files=paths, streaming=True, **kwargs)


def cached_file(path: Path, n_tokens: int = 2000, seed: int = 0) -> TokenFile:
    tokens = np.random.default_rng(seed).integers(CACHED_LOW, CACHED_LOW + 1000, size=n_tokens).astype(np.uint16)
    tokens.tofile(path)
    return TokenFile(str(path), "uint16", n_tokens)


def loader(sources, files, schedule, tokenizer, rank=0, world=1, workers=0, **kwargs):
    return streaming_train_loader(sources, files, schedule, tokenizer, eos_id(tokenizer), SEQ_LEN, BATCH, rank,
                                  world, workers, seed=0, **kwargs)


def take(batches, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(batches) for _ in range(n)]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_encoding_is_each_document_then_eos(tokenizer):
    docs = documents(50, seed=3)
    oracle = [i for doc in docs for i in [*tokenizer.encode(doc, add_special_tokens=False).ids, 7]]
    assert encode_with_eos(tokenizer, docs, 7).tolist() == oracle


def test_windows_are_the_packed_stream_of_the_documents(tmp_path, tokenizer):
    """One reader, one shard: its windows are packing.window over `doc0 EOS doc1 EOS ...`, then the next epoch."""
    docs = documents(40)
    schedule = MixtureSchedule([PLACEHOLDER_WINDOWS], [1.0], seed=0)
    batches = iter(loader([stream_source(write_shards(tmp_path, docs, 1))], [None], schedule, tokenizer))
    tokens = encode_with_eos(tokenizer, docs, eos_id(tokenizer))
    n = n_windows(len(tokens), SEQ_LEN)
    samples = [(a, b) for batch in take(batches, n // BATCH) for a, b in zip(batch["input_ids"], batch["labels"])]
    for i, (inputs, labels) in enumerate(samples):
        expected_inputs, expected_labels = window(tokens, i, SEQ_LEN)
        assert np.array_equal(inputs.numpy(), expected_inputs) and np.array_equal(labels.numpy(), expected_labels)


def reader_documents(batches: list[dict[str, torch.Tensor]], workers: int, tokenizer) -> dict[int, list[str]]:
    """Per DataLoader worker, the documents of the token stream its windows pack (the last, partial one left out)."""
    streams: dict[int, list[int]] = {}
    for batch in batches:
        g = int(batch["index"][0]) // (2 * BATCH)
        for inputs, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            stream = streams.setdefault(g % workers, [])
            if stream:
                assert stream[-1] == inputs[0]  # consecutive windows of a reader share one token
                stream.extend(labels)
            else:
                stream.extend([inputs[0], *labels])
    eos = eos_id(tokenizer)
    out = {}
    for worker, stream in streams.items():
        cut = [i for i, t in enumerate(stream) if t == eos]
        starts = [0] + [i + 1 for i in cut[:-1]]
        out[worker] = [tokenizer.decode(stream[a:b]) for a, b in zip(starts, cut)]
    return out


@pytest.mark.parametrize("fmt,n_shards", [("jsonl", 8), ("jsonl", 5), ("parquet", 6)])
def test_two_ranks_two_workers_read_every_document_once_per_epoch(tmp_path, tokenizer, fmt, n_shards):
    docs = documents(240)
    source = stream_source(write_shards(tmp_path, docs, n_shards, fmt), fmt)
    schedule = MixtureSchedule([PLACEHOLDER_WINDOWS], [1.0], seed=0)
    first_epochs = []
    for rank in range(2):
        batches = take(iter(loader([source], [None], schedule, tokenizer, rank, 2, workers=2)), 120)
        for worker, read in reader_documents(batches, 2, tokenizer).items():
            again = read.index(read[0], 1)  # the reader's share starts over after one epoch, in the same order
            second = read[again : 2 * again]
            assert second == read[: len(second)], (rank, worker)
            first_epochs += read[:again]
    assert Counter(first_epochs) == Counter(docs)


def test_cached_only_mixture_gives_the_map_style_batches(tmp_path, tokenizer):
    files = [cached_file(tmp_path / "a.bin", 900, seed=1), cached_file(tmp_path / "b.bin", 1500, seed=2)]
    windows = [np.arange(n_windows(f.n_tokens, SEQ_LEN)) for f in files]
    schedule = MixtureSchedule(windows, [0.4, 0.6], seed=5, block_size=64)
    sources = [Source("a"), Source("b")]
    for rank in range(2):
        streamed = take(iter(loader(sources, files, schedule, tokenizer, rank, 2, workers=2)), 12)
        dataset = MixtureDataset(files, SEQ_LEN, schedule, 10**6)
        sampler = GlobalBatchSampler(dataset, BATCH, 10**5, rank, 2, lambda: 0)
        mapped = DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=True)
        assert_same_batches(streamed, take(iter(mapped), 12))


def test_mixture_follows_the_schedule_and_cached_samples_are_mixture_datasets(tmp_path, tokenizer):
    files = [None, cached_file(tmp_path / "c.bin")]
    windows = [PLACEHOLDER_WINDOWS, np.arange(n_windows(files[1].n_tokens, SEQ_LEN))]
    schedule = MixtureSchedule(windows, [0.3, 0.7], seed=3, block_size=64)
    sources = [stream_source(write_shards(tmp_path / "s", documents(200), 4)), Source("cached")]
    samples = {}
    for rank in range(2):
        for batch in take(iter(loader(sources, files, schedule, tokenizer, rank, 2, workers=2)), 16):
            for i, k in enumerate(batch["index"].tolist()):
                samples[k] = {key: value[i] for key, value in batch.items()}
    assert sorted(samples) == list(range(2 * 64))  # two schedule blocks, every sample once
    reference = MixtureDataset([files[1], files[1]], SEQ_LEN, schedule, 10**6)
    for n in (64, 128):
        is_cached = [bool(samples[k]["input_ids"].min() >= CACHED_LOW) for k in range(n)]
        assert [n - sum(is_cached), sum(is_cached)] == schedule.samples_before(n).tolist()
        for k in range(n):
            assert is_cached[k] == (schedule.source_ordinal(k)[0] == 1)
            if is_cached[k]:
                assert all(torch.equal(samples[k][key], reference[k][key]) for key in samples[k])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("n_shards", [8, 3])  # 3 shards < 2 ranks x 2 workers: every rank reads all, keeps its half
@pytest.mark.parametrize("prefetch", [0, 1])  # Lightning takes a batch ahead of the step that consumes it
def test_resume_continues_exactly(tmp_path, tokenizer, workers, n_shards, prefetch):
    files = [None, cached_file(tmp_path / "c.bin")]
    windows = [PLACEHOLDER_WINDOWS, np.arange(n_windows(files[1].n_tokens, SEQ_LEN))]
    schedule = MixtureSchedule(windows, [0.6, 0.4], seed=1, block_size=64)
    sources = [stream_source(write_shards(tmp_path / "s", documents(60), n_shards)), Source("cached")]
    n = 9  # several epochs of every reader's share of the 60 documents pass in 3n batches
    expected = take(iter(loader(sources, files, schedule, tokenizer, 1, 2, workers)), 3 * n)

    consumed = Counter()
    got, state = [], None
    for _ in range(3):  # run n batches, save, resume in a fresh loader: twice
        first = loader(sources, files, schedule, tokenizer, 1, 2, workers, consumed_batches=consumed.total)
        if state is not None:
            first.load_state_dict(pickle.loads(pickle.dumps(state)))  # as a checkpoint holds it
        batches = iter(first)
        ahead = take(batches, prefetch)
        for _ in range(n):
            ahead += take(batches, 1)
            got.append(ahead.pop(0))
            consumed["batches"] += 1
        state = first.state_dict()
        assert state["ranks"][1]["next_batch"] == consumed.total()
    assert_same_batches(got, expected)


def test_resume_refuses_other_readers(tmp_path, tokenizer):
    schedule = MixtureSchedule([PLACEHOLDER_WINDOWS], [1.0], seed=0)
    sources = [stream_source(write_shards(tmp_path, documents(60), 4))]
    first = loader(sources, [None], schedule, tokenizer, 0, 2, workers=2)
    take(iter(first), 3)
    state = first.state_dict()
    with pytest.raises(IncompatibleResume, match="num_workers 2 -> 0"):
        loader(sources, [None], schedule, tokenizer, 0, 2, workers=0).load_state_dict(state)
    with pytest.raises(IncompatibleResume, match="no streaming position for rank 1"):
        loader(sources, [None], schedule, tokenizer, 1, 2, workers=2).load_state_dict(state)


def test_stream_errors_name_the_source(tmp_path, tokenizer):
    schedule = MixtureSchedule([PLACEHOLDER_WINDOWS], [1.0], seed=0)
    paths = write_shards(tmp_path, documents(20), 2)
    with pytest.raises(DataError, match="'web' has no column 'body'"):
        loader([stream_source(paths, text_field="body", name="web")], [None], schedule, tokenizer)
    with pytest.raises(DataError, match="'one' has 1 shard.*TextDataModule.num_workers"):
        loader([stream_source(paths[:1], name="one")], [None], schedule, tokenizer, workers=2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    source = stream_source([paths[0], str(empty)], name="half-empty")
    with pytest.raises(DataError, match="'half-empty' gave no documents to rank 1"):
        next(iter(loader([source], [None], schedule, tokenizer, 1, 2)))


def test_shard_strategy(tmp_path, tokenizer):
    source = Source("hf:json", streaming=True)
    assert shard_strategy(source, 5, 2, 2) == "shards"  # uneven: one rank gets 3 shards, the other 2
    assert shard_strategy(source, 3, 2, 2) == "examples"
    assert shard_strategy(source, 1, 4, 0) == "examples"
    with pytest.raises(DataError):
        shard_strategy(source, 3, 1, 4)
    schedule = MixtureSchedule([PLACEHOLDER_WINDOWS], [1.0], seed=0)
    with pytest.warns(UserWarning, match="every device reads all of it"):
        loader([stream_source(write_shards(tmp_path, documents(20), 3))], [None], schedule, tokenizer, 0, 2, 2)


def _ddp_worker(rank: int, folder: str, paths: list[str], tokenizer_json: str):
    from tokenizers import Tokenizer

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    schedule = MixtureSchedule([PLACEHOLDER_WINDOWS], [1.0], seed=0)
    first = loader([stream_source(paths)], [None], schedule, tokenizer, rank, 2)
    batches = iter(first)
    take(batches, 3)
    state = first.state_dict()  # gathered: every rank holds every rank's position
    expected = next(batches)
    resumed = loader([stream_source(paths)], [None], schedule, tokenizer, rank, 2)
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    torch.save({"ranks": sorted(state["ranks"]), "same": torch.equal(got["input_ids"], expected["input_ids"])},
               f"{folder}/result{rank}.pt")
    torch.distributed.destroy_process_group()


def test_state_holds_every_ranks_position_under_torch_distributed(tmp_path, tokenizer):
    paths = write_shards(tmp_path / "s", documents(60), 4)
    torch.multiprocessing.start_processes(_ddp_worker, args=(str(tmp_path), paths, tokenizer.to_str()), nprocs=2,
                                          start_method="fork")
    for rank in range(2):
        assert torch.load(tmp_path / f"result{rank}.pt") == {"ranks": [0, 1], "same": True}


class _RecordingModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(CACHED_LOW + 1000, 4)
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({key: value.clone() for key, value in batch.items()})
        return self.embedding(batch["input_ids"]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _StreamingData(pl.LightningDataModule):
    """What TextDataModule does with a streaming mixture: counts the training batches consumed (Lightning calls
    on_before_batch_transfer right before each step, not when prefetching), saves that count, and hands it to the
    loader, whose own state Lightning saves and restores."""

    def __init__(self, build):
        super().__init__()
        self.build = build
        self.consumed_batches = 0

    def train_dataloader(self):
        return self.build(consumed_batches=lambda: self.consumed_batches)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.trainer.training:
            self.consumed_batches += 1
        return batch

    def state_dict(self):
        return {"consumed_batches": self.consumed_batches}

    def load_state_dict(self, state_dict):
        self.consumed_batches = state_dict["consumed_batches"]


@pytest.mark.parametrize("workers", [0, 2])
def test_trainer_resume_mid_stream_is_exact(tmp_path, tokenizer, workers):
    files = [None, cached_file(tmp_path / "c.bin")]
    windows = [PLACEHOLDER_WINDOWS, np.arange(n_windows(files[1].n_tokens, SEQ_LEN))]
    schedule = MixtureSchedule(windows, [0.7, 0.3], seed=2, block_size=64)
    sources = [stream_source(write_shards(tmp_path / "s", documents(60), 4)), Source("cached")]

    def fit(max_steps, ckpt_path=None, every=None, epoch_batches=None):
        model = _RecordingModel()
        data = _StreamingData(lambda **kw: loader(sources, files, schedule, tokenizer, workers=workers, **kw))
        trainer = pl.Trainer(
            max_steps=max_steps, limit_train_batches=epoch_batches, accelerator="cpu", devices=1, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(every),
            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1,
                                       filename="{step}")] if every else [],
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return model.seen

    full = fit(12, every=5)
    resumed = fit(12, ckpt_path=tmp_path / "ckpt" / "step=5.ckpt")
    assert_same_batches(resumed, full[5:])
    # Lightning epochs of 4 batches: each epoch iterates the loader anew, and the stream goes on where it stood.
    assert_same_batches(fit(12, epoch_batches=4), full)



def test_the_data_module_refuses_a_stream_it_cannot_read(tmp_path):
    from moe.data import TextDataModule
    from moe.errors import InputError

    shard = tmp_path / "s.jsonl"
    shard.write_text('{"text": "a b c"}\n')
    with pytest.raises(InputError, match="is streamed while training: give a tokenizer"):
        _ = TextDataModule(sources=[Source("hf:json", data_files=[str(shard)], streaming=True)],
                           cache_dir=str(tmp_path / "cache")).n_vocab
    with pytest.raises(DataError, match=r"Source.streaming is for 'hf:' sources \(source '.*s.jsonl'\)"):
        _ = TextDataModule(sources=[Source(str(shard), streaming=True)], cache_dir=str(tmp_path / "cache")).n_vocab


def test_resuming_onto_another_stream_is_refused(tmp_path):
    # A stream's content is not read ahead, so its settings stand for it in the resume fingerprint.
    from moe.data import TextDataModule
    from moe.data.tokenizer import train_tokenizer

    shards = []
    for i in range(2):
        shards.append(tmp_path / f"s{i}.jsonl")
        shards[-1].write_text("".join(json.dumps({"text": f"def f{i}_{j}(x): return x"}) + "\n" for j in range(50)))
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer(["def f(x): return x"] * 20, 300).save(str(tokenizer))

    def data(files, revision=None):
        module = TextDataModule(sources=[Source("hf:json", data_files=[str(f) for f in files], streaming=True,
                                                revision=revision)],
                                tokenizer=str(tokenizer), seq_len=8, batch_size=2, num_workers=0,
                                cache_dir=str(tmp_path / "cache"))
        module.setup("fit")
        return module

    state = data(shards).state_dict()
    data(shards).load_state_dict(state)  # the same stream resumes
    for changed in (data(shards[:1]), data(shards, revision="v2")):
        with pytest.raises(IncompatibleResume, match=r"TextDataModule.sources \(name, content hash, weight\)"):
            changed.load_state_dict(state)
