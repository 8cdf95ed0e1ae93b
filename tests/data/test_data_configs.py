"""configs/data/fineweb-edu-stream.yaml reads batches when its Hub source is replaced by the same kind of source on
local Parquet shards (tests/test_cli.py composes every data config with the quickstart's)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from moe.data import Source, TextDataModule

CONFIGS = Path(__file__).parent.parent.parent / "configs" / "data"


def test_the_streaming_config_reads_local_parquet_shards(tmp_path, helpers):
    settings = yaml.safe_load((CONFIGS / "fineweb-edu-stream.yaml").read_text())["data"]
    (stream,) = settings["sources"]
    docs = helpers.make_documents(120, seed=4)
    files = []
    for i in range(4):
        files.append(str(tmp_path / f"train-{i:05d}.parquet"))
        pq.write_table(pa.table({"text": docs[i * 30 : (i + 1) * 30]}), files[-1])
    tokenizer = tmp_path / "tokenizer.json"
    from moe.data.tokenizer import train_tokenizer

    train_tokenizer(docs, 300).save(str(tokenizer))
    local = Source(path="hf:parquet", data_files=files, streaming=stream["streaming"], split=stream["split"],
                   name=stream["name"])
    data = TextDataModule(sources=[local], tokenizer=str(tokenizer), seq_len=32, batch_size=2, num_workers=0,
                          cache_dir=str(tmp_path / "cache"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32)
