"""The Lightning DataModule: a prepared corpus (corpus.py: sources -> tokenizer -> cached token arrays -> packed
windows) served as mixture batches to each process, and its position in the stream saved for resume. A mixture with
a streaming source is served by streaming_loader.py, which reads the stream while training.

Everything a batch contains follows from (sources, tokenizer, seq_len, seed, global batch size) and the number of
training batches consumed so far, which is counted in `on_before_batch_transfer` (Lightning calls it right before
each training step, micro-batches of an accumulated step included, not when prefetching) and saved in the
checkpoint: a resumed run gets exactly the next batch. The checkpoint also holds a fingerprint of what gives those
batches their meaning (sources, tokenizer, token cache checksums, batch shape and accumulation), and a resume onto
a different one is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from moe.data.checks import check_arguments, fingerprint_changes
from moe.data.corpus import TokenCorpus
from moe.data.datasets import MixtureDataset, ValidationDataset
from moe.data.parallel_tokenize import default_num_proc
from moe.data.report import format_report
from moe.data.sampler import EvalShardSampler, GlobalBatchSampler, ResumableLoader
from moe.data.sources import STDLIB, DataError, Source
from moe.data.streaming_loader import streaming_train_loader
from moe.errors import IncompatibleResume

# Whole stdlib of CPython 3.11 without tests is ~12 MB; training a 4096-token BPE on it and tokenizing it takes
# ~8 s on 2 cores. The cap bounds that on Pythons with a larger stdlib.
DEFAULT_CORPUS_MAX_BYTES = 16_000_000
DEFAULT_PROMPTS = ["def fibonacci(n):\n", "import os\n\n", "class Stack:\n    "]


class TextDataModule(pl.LightningDataModule):
    def __init__(
        self,
        sources: list[Source] | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.01,
        num_workers: int = 2,
        num_proc: int | None = None,
        seed: int = 1234,
        cache_dir: str | None = None,
        corpus_max_bytes: int | None = DEFAULT_CORPUS_MAX_BYTES,
        planned_tokens: int | None = None,
        prompts: list[str] = DEFAULT_PROMPTS,
    ):
        """Text sources tokenized, packed and mixed into training and validation batches.

        Args:
            sources: Mixture entries (path, weight, text_field, split, name; data_files, revision and streaming for
                hf: sources; token_dtype for pre-tokenized shards); None means the embedded corpus, the running
                Python's standard library, which needs no download.
            tokenizer: Path to a tokenizer.json or a folder with one; None trains a byte-level BPE on the sources
                (which needs sources of text, not pre-tokenized or streamed).
            vocab_size: Vocabulary size of a tokenizer trained here.
            seq_len: Tokens per training sequence.
            batch_size: Sequences per batch on each device.
            val_fraction: Share of each source's sequences held out for validation.
            num_workers: DataLoader worker processes.
            num_proc: Processes that tokenize the corpus before training; None uses every core this process may use.
            seed: Seed of the validation split and the mixture order (non-negative).
            cache_dir: Where tokenizers and token arrays are cached; None means $MOE_CACHE_DIR or
                ~/.cache/moe-lightning.
            corpus_max_bytes: Cap on the bytes of the embedded corpus; None takes all of it.
            planned_tokens: Training tokens planned, for the epochs column of the report; None derives them from
                the trainer's max_steps.
            prompts: Prompts served by predict_dataloader.
        """
        super().__init__()
        check_arguments(sources, tokenizer, vocab_size, seq_len, batch_size, val_fraction, num_workers, num_proc, seed,
                        corpus_max_bytes, planned_tokens, prompts)
        self.sources = list(sources) if sources else [Source(STDLIB)]
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = Path(cache_dir or os.environ.get("MOE_CACHE_DIR") or Path.home() / ".cache" / "moe-lightning")
        self.planned_tokens = planned_tokens
        self.prompts = list(prompts)
        self.corpus = TokenCorpus(self.sources, tokenizer, vocab_size, seq_len, val_fraction, seed, self.cache_dir,
                                  corpus_max_bytes, num_proc or default_num_proc())
        self.consumed_batches = 0
        self._reported = False
        self._checkpoint_fingerprint: dict | None = None

    # ---- tokenizer (the corpus's) ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self.corpus.tokenizer

    @property
    def n_vocab(self) -> int:
        """Ids the model's embedding must cover (the model's vocab_size is linked to this)."""
        return self.corpus.n_vocab

    @property
    def eos_id(self) -> int:
        return self.corpus.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # ---- setup --------------------------------------------------------------------------------------------------

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's rank among the processes that read different data, and their number: the strategy's
        sampler settings, so that the processes of a tensor-parallel group, which must see the same batch, read
        the same rows (every process, under the strategies without model parallelism)."""
        if self.trainer is None:
            return 0, 1
        sampler = getattr(getattr(self.trainer, "strategy", None), "distributed_sampler_kwargs", None)
        if sampler:
            return sampler["rank"], sampler["num_replicas"]
        return self.trainer.global_rank, self.trainer.world_size

    def _is_first_process(self) -> bool:
        return self.trainer is None or self.trainer.global_rank == 0

    def prepare_data(self) -> None:
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return  # prompts need only the tokenizer
        self._prepare()
        if not self.corpus.streaming:  # a stream has no epoch: the run's length is Trainer.max_steps
            self.batches_per_epoch()  # fail now, not at the first step, when the corpus is too small
        n_val, world = self.corpus.n_val, self._rank_and_world()[1]
        if 0 < n_val < world:
            raise DataError(
                f"{n_val} validation sequences cannot give each of {world} devices one; raise "
                "TextDataModule.val_fraction or set it to 0"
            )
        if self._checkpoint_fingerprint is not None:
            self._check_fingerprint(self._checkpoint_fingerprint)
        # prepare_data() may have built everything already; the report is printed once, at the first setup.
        if not self._reported and self._is_first_process():
            self._reported = True
            rank_zero_info("\n" + self.report())

    def _prepare(self) -> None:
        self.corpus.prepare(show_progress=self._is_first_process())

    def _require_setup(self) -> None:
        if not self.corpus.prepared:
            raise RuntimeError("call setup() first")

    def global_batch_size(self) -> int:
        """Sequences per training batch over the data-parallel devices (per micro-batch: accumulation multiplies it
        per step)."""
        return self.batch_size * self._rank_and_world()[1]

    def _accumulate_grad_batches(self) -> int:
        return getattr(self.trainer, "accumulate_grad_batches", 1)  # 1 without a trainer

    def batches_per_epoch(self) -> int:
        """Whole global batches in one epoch of all training sequences."""
        self._require_setup()
        n_train = self.corpus.n_train
        batches = n_train // self.global_batch_size()
        if batches == 0:
            raise DataError(
                f"the corpus is smaller than one batch: {n_train} training sequences of {self.seq_len} tokens "
                f"({self.corpus.describe_train_windows()}), but one global batch needs {self.global_batch_size()} "
                f"(batch_size {self.batch_size} x {self._rank_and_world()[1]} data-parallel devices); add data or lower "
                "TextDataModule.seq_len / TextDataModule.batch_size"
            )
        return batches

    # ---- dataloaders --------------------------------------------------------------------------------------------

    def _loader(
        self, dataset: Dataset, batch_size: int | None = None, loader_class: type = DataLoader, **kwargs: Any
    ) -> DataLoader:
        if self.num_workers > 0:
            # Workers are forked after the tokenizer used its Rust thread pool, which `tokenizers` answers with a
            # warning per worker; the workers never tokenize, so say so up front.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return loader_class(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            # Each new iterator draws its workers' base seed from this generator, not from torch's global one: a
            # resumed run creates iterators the uninterrupted run did not, and must not shift the training's
            # random stream by doing so (the batches themselves do not depend on any seed drawn here).
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        rank, world = self._rank_and_world()
        corpus = self.corpus
        if corpus.streaming:
            # Its own loader (streaming_loader.py), which saves its position in the stream for resume; the batches
            # of the cached sources in the mixture are the ones the map-style loader below would give.
            return streaming_train_loader(self.sources, corpus.files, corpus.schedule, self.tokenizer, self.eos_id,
                                          self.seq_len, self.batch_size, rank, world, self.num_workers, self.seed,
                                          consumed_batches=lambda: self.consumed_batches)
        batches = self.batches_per_epoch()
        dataset = MixtureDataset(corpus.files, self.seq_len, corpus.schedule, batches * self.global_batch_size())
        sampler = GlobalBatchSampler(dataset, self.batch_size, batches, rank, world, lambda: self.consumed_batches)
        return self._loader(dataset, self.batch_size, sampler=sampler, drop_last=True, loader_class=ResumableLoader)

    def val_dataloader(self) -> DataLoader | list:
        self._require_setup()
        dataset = ValidationDataset(self.corpus.files, self.seq_len, self.corpus.val_windows)
        if len(dataset) == 0:
            return []  # val_fraction 0 or sources of one sequence: Lightning then skips validation
        rank, world = self._rank_and_world()
        # The sampler yields whole batches (batch_size=None turns off the loader's batching); being a
        # DistributedSampler, Lightning keeps it instead of padding ranks with repeated windows.
        return self._loader(dataset, sampler=EvalShardSampler(dataset, self.batch_size, rank, world))

    def test_dataloader(self) -> DataLoader | list:
        # The held-out split: `test` reports the same loss as validation, e.g. for a checkpoint after training.
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        items = [{"prompt": p, "input_ids": torch.tensor([self.encode(p)], dtype=torch.long)} for p in self.prompts]
        # batch_size=None turns off collation: one item per prompt, prompts of different lengths stay apart.
        return DataLoader(_ListDataset(items), batch_size=None, shuffle=False)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is None or self.trainer.training:
            self.consumed_batches += 1
        return batch

    # ---- resume -------------------------------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        """What must match for a saved stream position to mean the same batches."""
        return {
            **self.corpus.fingerprint(),
            "global_batch_size": self.global_batch_size(),
            # consumed_batches counts micro-batches, so the stream continues exactly under another accumulation,
            # but each optimizer step would then train on another number of tokens.
            "accumulate_grad_batches": self._accumulate_grad_batches(),
        }

    def state_dict(self) -> dict[str, Any]:
        self._prepare()
        return {"consumed_batches": self.consumed_batches, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed_batches = int(state_dict["consumed_batches"])
        self._checkpoint_fingerprint = state_dict["fingerprint"]
        if self.corpus.prepared:  # Lightning restores after setup; otherwise setup checks it
            self._check_fingerprint(self._checkpoint_fingerprint)

    def _check_fingerprint(self, saved: dict) -> None:
        changed = fingerprint_changes(saved, self.fingerprint(), [path for f in self.corpus.files if f for path in f.paths])
        if changed:
            raise IncompatibleResume(
                "the data pipeline differs from the checkpoint's, so resuming would not continue the "
                "same stream:\n  " + "\n  ".join(changed)
            )

    # ---- statistics ---------------------------------------------------------------------------------------------

    def max_token_id(self) -> int:
        return self.corpus.max_token_id()

    def _resolved_planned_tokens(self) -> int | None:
        if self.planned_tokens is not None:
            return self.planned_tokens
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "max_steps", -1) and trainer.max_steps > 0:
            batches = trainer.max_steps * self._accumulate_grad_batches()
            return batches * self.global_batch_size() * self.seq_len
        return None

    def report(self) -> str:
        self._require_setup()
        tokenizer = self.corpus.describe_tokenizer()
        tokenizer_line = f"tokenizer: {tokenizer}, n_vocab {self.n_vocab}; seq_len {self.seq_len}"
        return format_report(self.corpus.source_rows(), self._resolved_planned_tokens(), tokenizer_line)

    def unigram_baseline(self) -> float:
        """Cross-entropy (nats/token) of the validation labels under the training unigram distribution."""
        return self.corpus.unigram_baseline()


class _ListDataset(Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]
