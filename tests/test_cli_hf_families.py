"""The families people start from, through the command line: an HF directory of OLMoE, Qwen2-MoE, Qwen3-MoE,
Llama 3 (scaled RoPE) or OLMo 3 (norms on the sublayers' outputs, windows) is trained with `fit --model.init_from`,
validated, and exported back with `moe export` as the same HF architecture, which transformers loads and computes
our logits with."""

import json

import pytest
import torch
import transformers

import cli
from moe.generate import generate
from moe.hf import load_hf_checkpoint

from .cli_runs import tiny_run_args
from .tiny_models import randomize

DIMS = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "OlmoeForCausalLM": lambda: transformers.OlmoeConfig(**DIMS, num_experts=4, num_experts_per_tok=2),
    "Qwen2MoeForCausalLM": lambda: transformers.Qwen2MoeConfig(**DIMS, moe_intermediate_size=16,
                                                               shared_expert_intermediate_size=32, num_experts=4,
                                                               num_experts_per_tok=2, mlp_only_layers=[0]),
    "Qwen3MoeForCausalLM": lambda: transformers.Qwen3MoeConfig(**DIMS, head_dim=12, moe_intermediate_size=16,
                                                               num_experts=4, num_experts_per_tok=2),
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(**DIMS, head_dim=16, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # A window of 4 on the first layer: generating 6 tokens after a 4-token prompt runs past it.
    "Olmo3ForCausalLM": lambda: transformers.Olmo3Config(**DIMS, sliding_window=4,
                                                         layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("architecture", FAMILIES)
@torch.no_grad()
def test_an_hf_family_trains_validates_and_exports_back(workdir, architecture):
    source = workdir / "source"
    randomize(transformers.AutoModelForCausalLM.from_config(FAMILIES[architecture]())).save_pretrained(source)
    cli.main(["fit", *tiny_run_args(workdir), "--model.init_from", str(source), "--trainer.max_steps", "3"])
    run = workdir / "runs/quickstart/version_0"
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("val/loss")
    assert any(row.split(",")[column] for row in rows)  # validated
    cli.main(["export", str(run / "checkpoints/last.ckpt"), str(workdir / "exported")])
    assert json.loads((workdir / "exported/config.json").read_text())["architectures"] == [architecture]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(workdir / "exported", attn_implementation="eager")
    ours = load_hf_checkpoint(workdir / "exported")
    trained = ours.state_dict()
    started = load_hf_checkpoint(source).state_dict()
    assert any(not torch.equal(trained[k], started[k]) for k in trained)  # three steps changed the weights
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(theirs.eval()(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)
    # transformers generates with the export what our model generates: greedy decoding, token for token.
    prompt = ids[:1, :4]
    generated = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                pad_token_id=0)
    assert torch.equal(generated, generate(ours, prompt, max_new_tokens=6, temperature=0.0))
