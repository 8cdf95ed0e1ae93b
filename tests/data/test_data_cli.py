"""The data module through the command line: an unusable --data flag or tokenizer file ends with one message naming
it, a token cache changed after it was written is rebuilt instead of feeding the model other (or out-of-range) ids,
and a resume onto another accumulation or other token cache content is refused by name.
(tests/test_cli_errors.py has the bad source files; tests/data/test_token_cache.py the cache's cases one by one.)"""

import json
import random
import zlib

import numpy as np
import pytest
import torch

import cli
from moe.data.tokenizer import train_tokenizer

from ..cli_runs import refused, tiny_run_args


def fit_args(workdir, *extra: str) -> list[str]:
    return ["fit", *tiny_run_args(workdir), *extra]


def fit(workdir, *extra: str) -> None:
    cli.main(fit_args(workdir, *extra))


@pytest.mark.parametrize("flag,value,message", [
    ("num_workers", "-1", "--data.num_workers=-1 must be >= 0"),
    ("batch_size", "0", "--data.batch_size=0 must be >= 1"),
    ("val_fraction", "1", "--data.val_fraction=1.0 must be in [0, 1)"),
    ("vocab_size", "100", "--data.vocab_size=100 must be >= 257"),
])
def test_unusable_data_flag_exits_naming_it(workdir, capsys, flag, value, message):
    err = refused(capsys, fit_args(workdir, f"--data.{flag}", value))
    assert message in err and "TextDataModule" not in err  # the library's name for it, written as the flag
    assert not list(workdir.rglob("*.ckpt"))


def tokenizer_json(workdir) -> str:
    return train_tokenizer(["def value(self):\n    return count\n" * 20], 320).to_str()


# name -> (bytes of the file given as --data.tokenizer, what the message says)
BAD_TOKENIZERS = {
    "not UTF-8": (lambda w: b"\xff\xfe" + random.Random(0).randbytes(512), "not a readable tokenizer.json"),
    "truncated": (lambda w: tokenizer_json(w).encode()[:3000], "not a readable tokenizer.json"),
    "no end-of-text token": (lambda w: tokenizer_json(w).replace("<|endoftext|>", "<|stop|>").encode(),
                             "the tokenizer has none of the end-of-text tokens"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENIZERS))
def test_unreadable_tokenizer_file_exits_naming_it(workdir, capsys, kind):
    content, message = BAD_TOKENIZERS[kind]
    path = workdir / "tokenizer.json"
    path.write_bytes(content(workdir))
    err = refused(capsys, fit_args(workdir, "--data.tokenizer", str(path)))
    assert f"{path}: {message}" in err
    assert not list(workdir.rglob("*.ckpt"))


def last_checkpoint(workdir):
    return max(workdir.glob("runs/quickstart/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime_ns)


def token_cache_entry(workdir):
    # The corpus is a folder of files, each tokenized to an entry of its own: take the largest.
    bin_path = max((workdir / "cache" / "tokens").glob("*.bin"), key=lambda p: p.stat().st_size)
    return bin_path, bin_path.with_suffix(".json")


def test_changed_token_cache_is_rebuilt_and_the_run_resumes(workdir):
    # Ids at or past the model's vocabulary written into the cache (its metadata untouched) had reached the
    # embedding in Lightning's sanity check as an IndexError: the setup-time check read the metadata's largest id.
    fit(workdir)
    bin_path, _ = token_cache_entry(workdir)
    original = bin_path.read_bytes()
    tokens = np.memmap(bin_path, dtype=np.uint16, mode="r+")
    tokens[::50] = 400  # the tokenizer and the model have 320 ids
    tokens.flush()
    with pytest.warns(UserWarning, match=f"token cache: {bin_path} does not match its checksum.*; rebuilding it"):
        fit(workdir, "--trainer.max_steps", "8", "--ckpt_path", str(last_checkpoint(workdir)))
    # Rebuilt from the source, so identical, and the checkpoint's token cache fingerprint let the run resume.
    assert bin_path.read_bytes() == original
    assert torch.load(last_checkpoint(workdir), weights_only=True)["global_step"] == 8


def test_resume_with_other_accumulation_or_token_cache_content_is_refused(workdir, capsys):
    fit(workdir)
    last = str(last_checkpoint(workdir))
    err = refused(capsys, fit_args(workdir, "--trainer.max_steps", "8", "--ckpt_path", last,
                                   "--trainer.accumulate_grad_batches", "2"))
    assert "--trainer.accumulate_grad_batches (" in err and "checkpoint 1, now 2" in err and "Trainer." not in err
    # The whole entry replaced, array and metadata, by a consistent one with other content: it is not damaged, so
    # it would be used, but the checkpoint's stream position would then point at other tokens.
    bin_path, meta_path = token_cache_entry(workdir)
    tokens = np.memmap(bin_path, dtype=np.uint16, mode="r+")
    tokens[:100] = tokens[:100][::-1].copy()
    tokens.flush()
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "crc32": zlib.crc32(bin_path.read_bytes())}))
    err = refused(capsys, fit_args(workdir, "--trainer.max_steps", "8", "--ckpt_path", last))
    assert "token cache (CRC-32 of each source's token array)" in err and str(bin_path) in err
    assert len(list(workdir.glob("runs/quickstart/version_*/checkpoints/last.ckpt"))) == 1


def test_a_streaming_source_trains_and_resumes_through_the_command_line(workdir):
    # The stream (local JSONL shards read by datasets' streaming mode) mixed with the tiny run's cached corpus; the
    # stream has no length, so the run is max_steps long and validates every 2 steps on the cached source.
    texts = [p.read_text() for p in sorted((workdir / "corpus").iterdir())]
    shards = []
    for i in range(4):
        shards.append(str(workdir / f"stream-{i}.jsonl"))
        with open(shards[-1], "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts[i * 10 : (i + 1) * 10])
    tokenizer = workdir / "tokenizer.json"
    train_tokenizer(texts, 320).save(str(tokenizer))
    sources = [{"path": "hf:json", "data_files": shards, "streaming": True, "weight": 3},
               {"path": str(workdir / "corpus")}]
    streaming = ["--data.sources", json.dumps(sources), "--data.tokenizer", str(tokenizer),
                 "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null"]
    fit(workdir, *streaming, "--trainer.max_steps", "3")
    last = max(workdir.glob("runs/quickstart/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 3 and state["TextDataModule"]["consumed_batches"] == 3
    # The stream's position is the streaming loader's state, saved at the batch training consumed (not prefetched).
    (loader,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader["ranks"][0]["next_batch"] == 3
    assert state["TextDataModule"]["fingerprint"]["token_cache"][0] == ["json", "stream"]
    fit(workdir, *streaming, "--trainer.max_steps", "5", "--ckpt_path", str(last))
    resumed = max(workdir.glob("runs/quickstart/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert torch.load(resumed, weights_only=True)["global_step"] == 5
