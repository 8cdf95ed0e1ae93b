"""Pre-tokenized shards in and out: our token caches exported in the nanoGPT / OLMo layout (raw token arrays, one
file per shard) and read back as a source give the same stream and train through the command line; raw .bin and
.npy files of either id type and NumPy-format .npy files read alike; ids past the tokenizer or the model are refused
before step 1, naming the file; a folder mixing token arrays and text is refused; index files beside the shards are
left out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import cli
from moe.data import DataError, Source, TextDataModule
from moe.data.pretokenized import export_tokens
from moe.errors import InputError

from ..cli_runs import refused, tiny_run_args
from .test_shards import module, shard_folder, stream

SEQ_LEN = 16


def test_exported_caches_read_back_as_the_same_stream(tmp_path, helpers, tokenizer_file):
    folder, _ = shard_folder(tmp_path, helpers)
    original = module(folder, tmp_path, tokenizer_file)
    (exported,) = export_tokens(original.corpus, tmp_path / "tokens")
    metadata = json.loads((exported / "metadata.json").read_text())
    assert [f["file"] for f in metadata["files"]] == [f"part-{i:05d}.bin" for i in range(5)]
    assert metadata["dtype"] == "uint16" and metadata["eos_id"] == original.eos_id
    # The folder also holds metadata.json and tokenizer.json: not token arrays, left out.
    again = module(exported, tmp_path, str(exported / "tokenizer.json"))
    assert stream(again) == stream(original)
    assert len(again.corpus.files[0].files) == 5
    assert again.fingerprint()["token_cache"][0][1] == original.fingerprint()["token_cache"][0][1]
    assert again.unigram_baseline() == pytest.approx(original.unigram_baseline(), rel=1e-12)
    assert again.max_token_id() == original.max_token_id()
    with pytest.raises(DataError, match="exists and is not empty"):
        export_tokens(original.corpus, tmp_path / "tokens")


@pytest.mark.parametrize("layout", ["raw-bin-uint16", "raw-npy-uint32", "numpy-npy-uint32", "numpy-npy-uint16"])
def test_nanogpt_and_olmo_layouts(tmp_path, tokenizer_file, layout):
    rng = np.random.default_rng(0)
    kind, suffix, dtype = layout.split("-")
    ids = [rng.integers(0, 320, size=n).astype(dtype) for n in (300, 1, 257)]
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, part in enumerate(ids):
        path = folder / f"{i:03d}.{suffix}"
        np.save(path, part) if kind == "numpy" else part.tofile(path)
    (folder / "000.idx").write_bytes(b"\x00\x01")  # a document index beside the shards: not needed, left out
    source = {} if kind == "numpy" else {"token_dtype": dtype}
    data = module(folder, tmp_path, tokenizer_file, source=source)
    assert stream(data) == np.concatenate(ids).tolist()
    assert data.max_token_id() == max(int(p.max()) for p in ids)


def test_ids_past_the_tokenizer_are_refused_naming_the_file(tmp_path, tokenizer_file):
    folder = tmp_path / "shards"
    folder.mkdir()
    np.arange(100, dtype=np.uint16).tofile(folder / "a.bin")
    np.array([5, 900, 7] * 40, dtype=np.uint16).tofile(folder / "b.bin")
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder / 'b.bin'))}: holds token id 900, beyond the 320"):
        module(folder, tmp_path, tokenizer_file)


def test_bad_shards_and_settings_are_refused(tmp_path, tokenizer_file):
    folder = tmp_path / "shards"
    folder.mkdir()
    np.arange(100, dtype=np.uint16).tofile(folder / "a.bin")
    with pytest.raises(InputError, match="holds pre-tokenized shards: give the tokenizer that wrote them"):
        module(folder, tmp_path, None)
    with pytest.raises(DataError, match=r"Source.token_dtype='int8' must be one of"):
        module(folder, tmp_path, tokenizer_file, source={"token_dtype": "int8"})
    (folder / "c.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match=r"c.bin: 3 bytes is not a whole number of uint16 token ids"):
        module(folder, tmp_path, tokenizer_file)
    (folder / "c.bin").unlink()
    np.save(folder / "d.npy", np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(DataError, match=r"d.npy: a NumPy array of shape \(4, 4\)"):
        module(folder, tmp_path, tokenizer_file)
    (folder / "d.npy").unlink()
    (folder / "notes.txt").write_text("text")
    with pytest.raises(DataError, match=r"holds token arrays .*a.bin.* and other files .*notes.txt"):
        module(folder, tmp_path, tokenizer_file)


def test_pretokenized_shards_train_through_the_cli_and_a_too_small_model_is_refused(workdir, capsys):
    args = tiny_run_args(workdir)
    cli.main(["export-tokens", "--config", str(Path(cli.__file__).parent / "configs/data/stdlib.yaml"),
              "--data.sources", json.dumps([{"path": str(workdir / "corpus")}]), "--data.vocab_size", "320",
              "--data.num_proc", "1", str(workdir / "tokens")])
    shards = workdir / "tokens" / "corpus"
    assert len(list(shards.glob("*.bin"))) == 40
    pretokenized = [*args, "--data.sources", json.dumps([{"path": str(shards)}]),
                    "--data.tokenizer", str(shards / "tokenizer.json"), "--trainer.max_steps", "3"]
    cli.main(["fit", *pretokenized])
    assert list(workdir.glob("runs/quickstart/version_*/checkpoints/last.ckpt"))
    # A model whose vocabulary the shards' ids exceed (init_from fixes the vocabulary to the checkpoint's).
    err = refused(capsys, ["fit", *pretokenized, "--model.init_from", str(_tiny_checkpoint(workdir, vocab=64))])
    assert "the tokenizer has 320 token ids but the model's vocab_size is 64 (from --model.init_from=" in err, err


def _tiny_checkpoint(workdir: Path, vocab: int) -> Path:
    import torch

    from moe import get_preset
    from moe.train import LanguageModel

    config = get_preset("tiny-moe", vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=32,
                        n_experts=2, top_k=1)
    module = LanguageModel(config)
    module.configure_model()
    path = workdir / "small-vocab.ckpt"
    torch.save({"state_dict": module.state_dict(), "model_config": module.hparams["config"]}, path)
    return path


def test_byte_order_and_type_mistakes(tmp_path, tokenizer_file):
    folder = tmp_path / "big-endian"
    folder.mkdir()
    ids = np.arange(3, 300, dtype=">u2")
    np.save(folder / "a.npy", ids)  # a header that says big-endian: read as such
    assert stream(module(folder, tmp_path, tokenizer_file)) == ids.tolist()
    folder = tmp_path / "uint32"
    folder.mkdir()
    np.arange(1, 300, dtype=np.uint32).tofile(folder / "a.bin")  # uint32 ids read as the default uint16
    with pytest.raises(DataError, match=r"a.bin: every other id is 0, as when uint32 ids are read as uint16"):
        module(folder, tmp_path, tokenizer_file)
    assert stream(module(folder, tmp_path, tokenizer_file, source={"token_dtype": "uint32"})) == list(range(1, 300))
    (folder / "metadata.json").write_text(json.dumps({"dtype": "uint32"}))  # as moe export-tokens writes it
    np.arange(1, 300, dtype=np.uint16).tofile(folder / "a.bin")
    with pytest.raises(DataError, match=r"metadata.json \(written by moe export-tokens\) says the ids are uint32"):
        module(folder, tmp_path, tokenizer_file)
    folder = tmp_path / "damaged"
    folder.mkdir()
    np.save(folder / "a.npy", np.arange(300, dtype=np.uint16))
    (folder / "a.npy").write_bytes((folder / "a.npy").read_bytes()[:20])
    with pytest.raises(DataError, match=r"a.npy: a damaged NumPy header"):
        module(folder, tmp_path, tokenizer_file)


def test_exported_pretokenized_shards_read_back(tmp_path, tokenizer_file):
    # A .npy header's dtype ("<u2", ">u2") is written out as the raw ids' type name, in this machine's byte order.
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "a.npy", np.arange(3, 300, dtype=">u2"))
    np.save(folder / "b.npy", np.arange(5, 200, dtype="<u2"))
    original = module(folder, tmp_path, tokenizer_file)
    (exported,) = export_tokens(original.corpus, tmp_path / "tokens")
    assert json.loads((exported / "metadata.json").read_text())["dtype"] == "uint16"
    assert stream(module(exported, tmp_path, str(exported / "tokenizer.json"))) == stream(original)


def test_export_refuses_a_stream_and_names_folders_safely(tmp_path, helpers, tokenizer_file):
    folder, _ = shard_folder(tmp_path, helpers)
    glob = module(str(folder / "*.jsonl"), tmp_path, tokenizer_file)
    (exported,) = export_tokens(glob.corpus, tmp_path / "tokens")
    assert exported.name == "jsonl"  # not a folder named "*.jsonl", which would read back as a pattern
    assert stream(module(exported, tmp_path, str(exported / "tokenizer.json"))) == stream(glob)
    shard = helpers.write_jsonl(tmp_path / "s.jsonl", helpers.make_documents(5))
    streamed = TextDataModule(sources=[Source("hf:json", data_files=[str(shard)], streaming=True),
                                       Source(str(folder))], tokenizer=tokenizer_file, seq_len=SEQ_LEN, batch_size=2,
                              num_workers=0, num_proc=1, cache_dir=str(tmp_path / "cache"))
    streamed.setup("fit")
    with pytest.raises(DataError, match="is streamed while training: it has no token cache to export"):
        export_tokens(streamed.corpus, tmp_path / "more")


def test_a_shard_is_read_once_on_first_use(tmp_path, tokenizer_file, monkeypatch):
    # Its content hash and its scan (CRC-32, id counts) come from one read; a start that remembers its hash but
    # not its scan scans it alone, to the same record; a start that remembers both reads neither.
    import time

    from moe.data import locking, pretokenized

    monkeypatch.setattr(locking, "now_ns", lambda: time.time_ns() + 10**11)  # old files: hash records are kept
    folder = tmp_path / "shards"
    folder.mkdir()
    rng = np.random.default_rng(1)
    np.save(folder / "a.npy", rng.integers(0, 320, size=700_000).astype(np.uint16))  # a header, and 2 MB of ids
    rng.integers(0, 320, size=5000).astype(np.uint16).tofile(folder / "b.bin")
    scanned, real_update = [], pretokenized._Scan.update  # (tokens, read from a memory map of the file)

    def recording(self, ids):
        scanned.append((len(ids), isinstance(ids, np.memmap)))
        return real_update(self, ids)

    monkeypatch.setattr(pretokenized._Scan, "update", recording)
    first = module(folder, tmp_path, tokenizer_file)
    n_tokens = first.corpus.files[0].n_tokens
    # Scanned once, from the bytes read for the content hash: no second read of the file's memory map.
    assert sum(n for n, _ in scanned) == n_tokens == 705_000 and not any(mapped for _, mapped in scanned)
    records = {p.name: p.read_bytes() for p in (tmp_path / "cache" / "pretokenized").iterdir()}
    assert len(records) == 4  # a record and its counts per shard
    for path in (tmp_path / "cache" / "pretokenized").iterdir():
        path.unlink()
    scanned.clear()
    again = module(folder, tmp_path, tokenizer_file)
    assert sum(n for n, mapped in scanned if mapped) == n_tokens  # hashes remembered: token_shard scans, once
    assert all(mapped for _, mapped in scanned)
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache" / "pretokenized").iterdir()} == records
    scanned.clear()
    third = module(folder, tmp_path, tokenizer_file)
    assert scanned == []
    assert stream(first) == stream(again) == stream(third)
    assert first.fingerprint() == again.fingerprint() == third.fingerprint()
    assert first.unigram_baseline() == third.unigram_baseline()
