"""The parallel tokenization engine: its ids equal a per-document `Tokenizer.encode`, in order, whatever the number
of processes; workers are ended when the consumer stops early, their errors reach the caller, and they start
without importing torch or the parent's `__main__`."""

import multiprocessing
import os
import signal
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from moe.data.parallel_tokenize import default_num_proc, encode_chunks
from moe.data.tokenizer import eos_id, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
SPECIAL = ["", " ", "\n\n", "emoji 🦙🔥👩‍👩‍👧, 中文字符, 한국어", "control \x00\x07\x1b[31m\t\r\n\x7f", "x" * 3000]


@pytest.fixture
def tokenizer(helpers):
    return train_tokenizer(helpers.make_documents(80, seed=3), 350)


@pytest.fixture
def docs(helpers):
    return helpers.make_documents(60, seed=4) + SPECIAL


def oracle(chunk: list[str], tokenizer) -> list[int]:
    """The stream as documents encoded one at a time, each followed by EOS."""
    return [i for doc in chunk for i in tokenizer.encode(doc, add_special_tokens=False).ids + [eos_id(tokenizer)]]


def children() -> set[int]:
    return {process.pid for process in multiprocessing.active_children()}


@pytest.mark.parametrize("num_proc", [1, 2, 3])
def test_ids_equal_per_document_encoding(tokenizer, docs, num_proc):
    chunks = [docs[:1], docs[1:30], SPECIAL, [], docs[30:31], docs[31:]]
    results = list(encode_chunks(chunks, tokenizer, eos_id(tokenizer), num_proc, np.uint16))
    assert len(results) == len(chunks)
    for (ids, n_docs, n_bytes), chunk in zip(results, chunks):
        assert ids.dtype == np.uint16 and ids.tolist() == oracle(chunk, tokenizer)
        assert n_docs == len(chunk) and n_bytes == sum(len(doc.encode("utf-8")) for doc in chunk)


def test_many_chunks_come_back_in_order(tokenizer, docs):
    # Far more chunks than are in flight at once (2 per worker), of uneven sizes so that they finish out of order.
    chunks = [docs[i : i + 1 + i % 5] for i in range(len(docs))]
    streams = [ids.tolist() for ids, _, _ in encode_chunks(chunks, tokenizer, eos_id(tokenizer), 2, np.uint16)]
    assert streams == [oracle(chunk, tokenizer) for chunk in chunks]


def test_closing_early_ends_the_workers(tokenizer, docs):
    before = children()
    results = encode_chunks([docs] * 20, tokenizer, eos_id(tokenizer), 2, np.uint16)
    next(results)
    workers = [process for process in multiprocessing.active_children() if process.pid not in before]
    assert len(workers) == 2
    results.close()
    # Killed, not waited for (the other chunks in flight are not needed), and reaped: no zombies.
    assert [process.exitcode for process in workers] == [-signal.SIGTERM] * 2
    assert children() <= before


@pytest.mark.parametrize("num_proc", [1, 2])
def test_an_error_in_a_worker_reaches_the_caller(tokenizer, docs, num_proc):
    before = children()
    with pytest.raises(TypeError, match="TextEncodeInput"):  # tokenizers' message for a document that is not a str
        list(encode_chunks([docs, docs, ["fine", 42], docs], tokenizer, eos_id(tokenizer), num_proc, np.uint16))
    assert children() <= before


def test_a_worker_that_dies_fails_the_call_instead_of_hanging(tokenizer, docs):
    before = children()
    results = encode_chunks([docs] * 40, tokenizer, eos_id(tokenizer), 2, np.uint16)
    next(results)
    victim = next(process for process in multiprocessing.active_children() if process.pid not in before)
    os.kill(victim.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    with pytest.raises(BrokenProcessPool):
        list(results)
    assert children() <= before


@pytest.mark.parametrize("num_proc", [1, 2])
def test_an_id_past_the_dtype_is_refused(tokenizer, docs, num_proc):
    assert tokenizer.get_vocab_size() > 256
    with pytest.raises(ValueError, match=r"token id \d+ does not fit uint8"):
        list(encode_chunks([docs], tokenizer, eos_id(tokenizer), num_proc, np.uint8))


@pytest.mark.parametrize(("eos", "num_proc", "dtype", "message"), [
    (0, 0, np.uint16, "num_proc must be at least 1"),
    (70000, 1, np.uint16, "eos_id 70000 does not fit uint16"),
    (0, 2, np.float32, "dtype must be an integer type"),
])
def test_arguments_are_checked_before_any_work(tokenizer, eos, num_proc, dtype, message):
    with pytest.raises(ValueError, match=message):
        encode_chunks(iter(()), tokenizer, eos, num_proc, dtype)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads a worker's memory map from /proc")
def test_workers_do_not_load_torch(tokenizer, docs):
    # This process has torch loaded (the moe package imports it); a worker that imported `moe` to find its
    # function, as a plain pickled reference would have it do, would map torch's libraries too.
    assert "torch" in sys.modules
    before = children()
    results = encode_chunks([docs] * 8, tokenizer, eos_id(tokenizer), 2, np.uint16)
    next(results)
    maps = [Path(f"/proc/{pid}/maps").read_text() for pid in children() - before]
    results.close()
    assert len(maps) == 2 and not any("libtorch" in text for text in maps)


# A program whose __main__ leaves a mark each time it is imported: spawn and forkserver import a program's __main__
# in every process they start unless it is hidden from them. It stubs the moe packages so as not to import torch.
MAIN = """
import sys, types
with open(sys.argv[1], "a") as marks:
    marks.write("imported\\n")
for name in ("moe", "moe.data"):
    package = types.ModuleType(name); package.__path__ = [sys.argv[2] + "/" + name.replace(".", "/")]
    sys.modules[name] = package
if __name__ == "__main__":
    from tokenizers import Tokenizer
    from moe.data.parallel_tokenize import encode_chunks
    tokenizer = Tokenizer.from_str(sys.stdin.read())
    print(sum(ids.size for ids, _, _ in encode_chunks([["a b c"]] * 6, tokenizer, 0, 2, "uint16")))
"""


def test_workers_do_not_import_the_programs_main(tokenizer, tmp_path):
    script, marks = tmp_path / "program.py", tmp_path / "marks"
    script.write_text(MAIN)
    done = subprocess.run([sys.executable, str(script), str(marks), str(REPO)], input=tokenizer.to_str(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 6 * (len(tokenizer.encode("a b c").ids) + 1)
    assert marks.read_text() == "imported\n"  # by the program itself, by no worker


def test_default_num_proc_is_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    assert default_num_proc() == 2
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 5)
    assert default_num_proc() == 5
