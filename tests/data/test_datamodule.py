"""TextDataModule: batches against the packed stream, seeds, rank sharding, resume, statistics, errors, report."""

import json
import math
import re
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moe.data import DataError, Source, TextDataModule
from moe.errors import IncompatibleResume, InputError

SEQ_LEN, BATCH = 16, 4


@pytest.fixture
def sources(tmp_path, helpers):
    code = helpers.write_text_folder(tmp_path / "code", helpers.make_documents(40, seed=3))
    prose = helpers.write_jsonl(tmp_path / "prose.jsonl", helpers.make_documents(80, seed=4))
    return [Source(str(code), weight=1.0, name="code"), Source(str(prose), weight=3.0, name="prose")]


def make(sources, tmp_path, trainer=None, **overrides):
    kwargs = {
        "sources": sources,
        "vocab_size": 320,
        "seq_len": SEQ_LEN,
        "batch_size": BATCH,
        "num_workers": 0,
        "seed": 7,
        "val_fraction": 0.1,
        "cache_dir": str(tmp_path / "cache"),
    }
    module = TextDataModule(**{**kwargs, **overrides})
    module.trainer = trainer
    module.setup("fit")
    return module


def fake_trainer(rank=0, world=1, max_steps=-1, accumulate=1):
    return SimpleNamespace(
        global_rank=rank, world_size=world, training=True, max_steps=max_steps, accumulate_grad_batches=accumulate
    )


def take(module, n):
    """The first n training batches, each passed through the hook Lightning calls before a training step."""
    batches = []
    for batch in module.train_dataloader():
        if len(batches) == n:
            break
        batches.append(module.on_before_batch_transfer(batch, 0))
    return batches


def stream_of(module, source_index):
    file = module.corpus.files[source_index]
    return np.asarray(file.open()).tolist()


def test_batches_are_windows_of_the_source_streams(sources, tmp_path):
    module = make(sources, tmp_path)
    streams = [stream_of(module, s) for s in range(2)]
    for batch in take(module, 5):
        assert batch["input_ids"].shape == batch["labels"].shape == (BATCH, SEQ_LEN)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        for row, k in enumerate(batch["index"].tolist()):
            source, w = module.corpus.schedule(k)
            window = streams[source][w * SEQ_LEN : w * SEQ_LEN + SEQ_LEN + 1]
            assert batch["input_ids"][row].tolist() == window[:-1] and batch["labels"][row].tolist() == window[1:]
    assert [b["index"].tolist() for b in take(make(sources, tmp_path), 2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_eos_separates_documents(tmp_path, helpers):
    docs = helpers.make_documents(5, seed=9)
    module = make(
        [Source(str(helpers.write_text_folder(tmp_path / "d", docs)))], tmp_path, val_fraction=0.0, batch_size=1
    )
    stream, eos = stream_of(module, 0), module.eos_id
    assert stream.count(eos) == len(docs) and stream[-1] == eos
    pieces = module.decode(stream).split("<|endoftext|>")
    assert pieces == docs + [""]


def test_seed_determines_batches(sources, tmp_path):
    def first_batches(seed):
        return [b["input_ids"] for b in take(make(sources, tmp_path, seed=seed), 3)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # The held-out split follows the seed too.
    val = [[w.tolist() for w in make(sources, tmp_path, seed=seed).corpus.val_windows] for seed in (1, 1, 2)]
    assert val[0] == val[1] and all(x != y for x, y in zip(val[0], val[2]))


def test_mixture_follows_the_source_weights(sources, tmp_path):
    module = make(sources, tmp_path)
    block = module.corpus.schedule.block_size
    counts = Counter(module.corpus.schedule(k)[0] for k in range(2 * block))
    assert counts[0] == 2 * block // 4 and counts[1] == 2 * block * 3 // 4  # weights 1 and 3


def test_validation_windows_never_train(sources, tmp_path):
    module = make(sources, tmp_path)
    val = {(s, int(w)) for s, windows in enumerate(module.corpus.val_windows) for w in windows}
    n_train = sum(len(w) for w in module.corpus.train_windows)
    trained = {module.corpus.schedule(k) for k in range(3 * n_train)}
    assert val and not (val & trained)
    assert len(trained) == n_train
    val_batches = list(module.val_dataloader())
    assert sum(len(b["index"]) for b in val_batches) == len(val)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_the_single_rank_global_batch(sources, tmp_path, world):
    single = take(make(sources, tmp_path, batch_size=BATCH * world), 4)
    per_rank = [take(make(sources, tmp_path, trainer=fake_trainer(r, world)), 4) for r in range(world)]
    for g, batch in enumerate(single):
        for key in ("input_ids", "labels", "index"):
            assert torch.equal(torch.cat([per_rank[r][g][key] for r in range(world)]), batch[key])


def as_lightning_would(loader, rank, world):
    """The loader Lightning uses for validation on `rank` under DDP: it replaces a non-distributed sampler."""
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    if isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler = _get_distributed_sampler(loader, False, 0, RunningStage.VALIDATING, num_replicas=world, rank=rank)
    return _update_dataloader(loader, sampler, RunningStage.VALIDATING)


@pytest.mark.parametrize("world,batch_size", [(1, 4), (2, 4), (3, 4), (4, 1), (3, 5)])
def test_validation_under_ddp_sees_every_window_once(sources, tmp_path, world, batch_size):
    single = make(sources, tmp_path, batch_size=batch_size)
    expected = [b for batch in single.val_dataloader() for b in batch["input_ids"].tolist()]
    seen, n_batches = [], set()
    for rank in range(world):
        module = make(sources, tmp_path, trainer=fake_trainer(rank, world), batch_size=batch_size)
        batches = list(as_lightning_would(module.val_dataloader(), rank, world))
        n_batches.add(len(batches))  # equal, so no rank waits in a collective for one that has finished
        for batch in batches:
            assert len(batch["index"]) <= max(batch_size, 2)
            assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
            seen += batch["input_ids"].tolist()
    assert seen == expected and len(n_batches) == 1
    assert len(expected) == sum(len(v) for v in single.corpus.val_windows)
    assert len(expected) % 3 and len(expected) % 4  # so padding ranks to equal length would repeat windows


def test_fewer_validation_sequences_than_devices(tmp_path, helpers):
    path = helpers.write_jsonl(tmp_path / "d.jsonl", helpers.make_documents(40))
    with pytest.raises(DataError, match="validation sequences"):
        make([Source(str(path))], tmp_path, trainer=fake_trainer(0, 64), batch_size=1, val_fraction=0.01)


def resume_points(module):
    per_epoch = module.batches_per_epoch()
    return [1, per_epoch - 1, per_epoch, per_epoch + 2]


def test_resume_continues_with_the_next_batch(sources, tmp_path):
    reference = make(sources, tmp_path)
    per_epoch = reference.batches_per_epoch()
    # Iterating epoch after epoch, as Lightning does, re-entering the loader each epoch.
    expected = take(reference, per_epoch) + take(reference, per_epoch)
    assert expected[0]["index"].tolist() != expected[per_epoch]["index"].tolist()
    for n in resume_points(reference):
        original = make(sources, tmp_path)
        consumed = take(original, min(n, per_epoch)) + take(original, max(0, n - per_epoch))
        assert len(consumed) == n
        state = original.state_dict()
        resumed = TextDataModule(**original_kwargs(original))
        resumed.load_state_dict(state)
        resumed.setup("fit")
        following = take(resumed, 2)
        for got, want in zip(following, expected[n : n + 2]):
            assert torch.equal(got["index"], want["index"]) and torch.equal(got["input_ids"], want["input_ids"])


def original_kwargs(module):
    return {
        "sources": module.sources,
        "vocab_size": module.corpus.vocab_size,
        "seq_len": module.seq_len,
        "batch_size": module.batch_size,
        "num_workers": 0,
        "seed": module.seed,
        "val_fraction": module.corpus.val_fraction,
        "cache_dir": str(module.cache_dir),
    }


@pytest.mark.parametrize(
    "change,field",
    [
        ({"seq_len": 8}, r"TextDataModule.seq_len: checkpoint 16, now 8"),
        ({"seed": 8}, r"TextDataModule.seed: checkpoint 7, now 8"),
        ({"batch_size": 2},
         (r"global batch size \(TextDataModule.batch_size x data-parallel devices: Trainer.devices x Trainer.num_nodes "
         r"/ tensor-parallel size\): checkpoint 4, now 2")),
        ({"val_fraction": 0.2}, r"TextDataModule.val_fraction: checkpoint 0.1, now 0.2"),
        ({"vocab_size": 300}, r"tokenizer \(hash of its JSON\): checkpoint '\w+', now '\w+'"),
    ],
)
def test_resume_with_changed_pipeline_says_what_changed(sources, tmp_path, change, field):
    state = make(sources, tmp_path).state_dict()
    changed = make(sources, tmp_path, **change)
    with pytest.raises(IncompatibleResume, match=field):
        changed.load_state_dict(state)


def test_resume_with_other_accumulation_is_refused_naming_the_setting(sources, tmp_path):
    # The same micro-batches in the same order, but twice the tokens per optimizer step.
    state = make(sources, tmp_path).state_dict()
    changed = make(sources, tmp_path, trainer=fake_trainer(accumulate=2))
    assert changed.global_batch_size() == BATCH
    with pytest.raises(IncompatibleResume, match=r"Trainer.accumulate_grad_batches \(.*\): checkpoint 1, now 2"):
        changed.load_state_dict(state)
    make(sources, tmp_path, trainer=fake_trainer(accumulate=2)).load_state_dict(changed.state_dict())


def test_resume_onto_other_token_cache_content_is_refused_naming_the_file(sources, tmp_path):
    # A cache entry replaced as a whole, array and metadata (another tokenizer version, a copy from elsewhere): it is
    # consistent, so it is used, but the checkpoint's position would point at other tokens.
    original = make(sources, tmp_path)
    state = original.state_dict()
    (path,) = original.corpus.files[1].paths
    tokens = np.memmap(path, dtype=np.uint16, mode="r+")
    tokens[:100] = tokens[:100][::-1].copy()
    tokens.flush()
    meta_path = Path(path).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "crc32": zlib.crc32(np.asarray(tokens).tobytes())}))
    with pytest.raises(IncompatibleResume, match=rf"token cache \(CRC-32 .*\) in .*{re.escape(path)}.*: checkpoint "
                       r"\[\['code', '\w{8}'\], \['prose', '\w{8}'\]\], now"):
        make(sources, tmp_path).load_state_dict(state)


def test_checkpoint_from_before_a_fingerprint_key_still_resumes(sources, tmp_path):
    # Keys added to the fingerprint later (here the accumulation and the token cache's checksums) are missing from
    # older checkpoints; refusing them would strand every run started before the key was added.
    state = make(sources, tmp_path).state_dict()
    for key in ("accumulate_grad_batches", "token_cache"):
        del state["fingerprint"][key]
    make(sources, tmp_path, trainer=fake_trainer(accumulate=2)).load_state_dict(state)


def test_changed_source_content_is_caught(sources, tmp_path):
    state = make(sources, tmp_path, tokenizer=None).state_dict()
    with open(sources[1].path, "a") as f:
        f.write('{"text": "one more document"}\n')
    with pytest.raises(IncompatibleResume, match=r"TextDataModule.sources \(name, content hash, weight\)"):
        make(sources, tmp_path).load_state_dict(state)


@pytest.mark.parametrize("argument,value,message", [
    ("num_workers", -1, "TextDataModule.num_workers=-1 must be >= 0"),
    ("batch_size", 0, "TextDataModule.batch_size=0 must be >= 1"),
    ("seq_len", 0, "TextDataModule.seq_len=0 must be >= 1"),
    ("seed", -3, "TextDataModule.seed=-3 must be >= 0"),
    ("val_fraction", 1.0, r"TextDataModule.val_fraction=1.0 must be in \[0, 1\)"),
    ("val_fraction", float("nan"), r"TextDataModule.val_fraction=nan must be in \[0, 1\)"),
    ("corpus_max_bytes", 0, "TextDataModule.corpus_max_bytes=0 must be >= 1"),
    ("planned_tokens", -5, "TextDataModule.planned_tokens=-5 must be >= 1, or null to derive it from Trainer.max_steps"),
    ("vocab_size", 200, r"TextDataModule.vocab_size=200 must be >= 257 \(the 256 bytes and the end-of-text token\)"),
    ("prompts", ["def ", ""], r"TextDataModule.prompts\[1\] is empty"),
    ("sources", [Source("a"), Source("b", weight=0.0)],
     r"TextDataModule.sources\[1\].weight=0.0 must be positive \(source 'b'\)"),
    ("sources", [Source("a", weight=float("nan"))], r"TextDataModule.sources\[0\].weight=nan must be positive"),
])
def test_unusable_argument_is_refused_naming_its_setting(tmp_path, argument, value, message):
    with pytest.raises(InputError, match=f"^{message}"):
        TextDataModule(cache_dir=str(tmp_path), **{argument: value})


def test_corpus_smaller_than_one_batch(tmp_path, helpers):
    path = helpers.write_jsonl(tmp_path / "tiny.jsonl", helpers.make_documents(3))
    with pytest.raises(DataError, match="smaller than one batch"):
        make([Source(str(path))], tmp_path, batch_size=64)


def test_source_shorter_than_one_sequence(tmp_path):
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(DataError, match="fewer than one sequence"):
        make([Source(str(tmp_path / "short.txt"))], tmp_path)


def test_token_ids_fit_the_vocabulary(sources, tmp_path):
    module = make(sources, tmp_path)
    brute_force_max = max(max(stream_of(module, s)) for s in range(2))
    assert module.max_token_id() == brute_force_max < module.n_vocab


def test_unigram_baseline_matches_brute_force(sources, tmp_path):
    module = make(sources, tmp_path)
    V, T = module.n_vocab, SEQ_LEN
    weights = [0.25, 0.75]
    train_counts, val_labels = [], []
    for s in range(2):
        stream = stream_of(module, s)
        train = module.corpus.train_windows[s]
        train_counts.append(Counter(t for w in train for t in stream[w * T + 1 : w * T + T + 1]))
        val_labels += [t for w in module.corpus.val_windows[s] for t in stream[w * T + 1 : w * T + T + 1]]

    def p(token):
        return sum(wt * (c[token] + 1) / (sum(c.values()) + V) for wt, c in zip(weights, train_counts))

    expected = -sum(math.log(p(t)) for t in val_labels) / len(val_labels)
    assert module.unigram_baseline() == pytest.approx(expected, rel=1e-9)
    assert module.unigram_baseline() < math.log(V)


class _BoundedReads:
    """A token array that refuses whole-array reads and any read of more than `limit` tokens, and counts the
    tokens read (in `reads`, shared by the arrays of one test)."""

    def __init__(self, tokens, limit, reads):
        self.tokens, self.limit, self.reads = tokens, limit, reads

    def __len__(self):
        return len(self.tokens)

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole token array was read into memory")

    def __getitem__(self, index):
        got = np.asarray(self.tokens[index])
        assert got.size <= self.limit, f"read {got.size} tokens at once"
        self.reads.append(got.size)
        return got


def test_unigram_baseline_reads_only_validation_windows_in_bounded_chunks(sources, tmp_path, monkeypatch):
    from moe.data import datasets, report

    module = make(sources, tmp_path)
    expected = module.unigram_baseline()
    limit = 5 * SEQ_LEN
    monkeypatch.setattr(report, "_BASELINE_CHUNK_TOKENS", limit)
    real_open, reads = datasets.TokenFile.open, []
    monkeypatch.setattr(datasets.TokenFile, "open", lambda self: _BoundedReads(real_open(self), limit, reads))
    assert module.unigram_baseline() == pytest.approx(expected, rel=1e-12)
    # The token counts kept since tokenizing replace a pass over the corpus: only the validation windows' labels,
    # each source's first token and the tail past its last window are read.
    corpus = module.corpus
    outside_windows = sum(1 + files.n_tokens - 1 - (len(t) + len(v)) * SEQ_LEN
                          for files, t, v in zip(corpus.files, corpus.train_windows, corpus.val_windows))
    assert sum(reads) == corpus.n_val * SEQ_LEN + outside_windows < sum(f.n_tokens for f in corpus.files) // 5


def test_report_lists_every_source(sources, tmp_path):
    module = make(sources, tmp_path, trainer=fake_trainer(max_steps=100))
    report = module.report()
    planned = 100 * BATCH * SEQ_LEN
    for s, (name, proportion) in enumerate([("code", 0.25), ("prose", 0.75)]):
        row = next(line for line in report.splitlines() if line.startswith(name))
        train_sequences = len(module.corpus.train_windows[s])
        epochs = planned * proportion / (train_sequences * SEQ_LEN)
        assert re.search(
            rf"{100 * proportion:.1f}%\s+{train_sequences}\s+{train_sequences * SEQ_LEN / 1000:.1f}K", row
        ), row
        assert f"{epochs:.2f}" in row
    assert "Total" in report and "planned tokens: 6.4K" in report


def test_predict_items_keep_prompts_apart(sources, tmp_path):
    module = make(sources, tmp_path, prompts=["the fox", "12"])
    items = list(module.predict_dataloader())
    assert [i["prompt"] for i in items] == ["the fox", "12"]
    for item in items:
        assert item["input_ids"].shape == (1, len(module.encode(item["prompt"])))
        assert module.decode(item["input_ids"][0].tolist()) == item["prompt"]


def test_loaded_tokenizer_is_used(sources, tmp_path):
    trained = make(sources, tmp_path)
    trained.tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = make(sources, tmp_path, tokenizer=str(tmp_path), vocab_size=999)
    assert loaded.n_vocab == trained.n_vocab and loaded.encode("the 42") == trained.encode("the 42")


def test_workers_yield_the_same_batches(sources, tmp_path):
    in_process = take(make(sources, tmp_path), 3)
    with_workers = take(make(sources, tmp_path, num_workers=2), 3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(in_process, with_workers))
