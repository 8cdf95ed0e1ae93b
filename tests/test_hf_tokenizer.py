"""Our tokenizer saved into an HF directory: transformers' AutoTokenizer encodes and decodes identically."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from moe.hf_tokenizer import save_hf_tokenizer

TEXTS = ["def f(x):\n    return x + 12345", "  leading spaces, trailing  ", "héllo wörld 🙂 日本語", "", "\t\n"]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 0123456789"] * 20, trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    return tok


def test_transformers_loads_the_same_tokenization(tokenizer, tmp_path):
    save_hf_tokenizer(tokenizer, tmp_path, "<|endoftext|>", model_max_length=128)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token_id == tokenizer.token_to_id("<|endoftext|>")
    assert hf.model_max_length == 128
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.encode(text) == ids  # no BOS/EOS added by default
        assert hf.decode(ids) == tokenizer.decode(ids)


def test_unknown_eos_token_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="'</s>' is not in the tokenizer"):
        save_hf_tokenizer(tokenizer, tmp_path, "</s>", model_max_length=128)
    assert not (tmp_path / "tokenizer.json").exists()
