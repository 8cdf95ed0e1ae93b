"""Tokenizers in an HF model directory: write ours so that transformers' AutoTokenizer (and so lm-eval's HF
backend) loads exactly the same tokenization, and find the tokenizer an HF directory ships.

transformers reads `tokenizer.json` (the `tokenizers` library's own format, unchanged) through
PreTrainedTokenizerFast; `tokenizer_config.json` names that class and the end-of-text token.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, path: str | Path, eos_token: str, model_max_length: int) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`."""
    if tokenizer.token_to_id(eos_token) is None:
        raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos_token,
        # Documents are packed with EOS between them and no BOS, so none is added at encoding time.
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos_token}, indent=2) + "\n")
    return path
