"""Auxiliary-loss-free load balancing (moe/train/expert_bias.py): the update rule against hand computations, the
update of a Lightning fit against loads counted independently from the routers' choices, its balancing effect,
checkpointing and resuming, and the loaders' handling of the bias (init_from, HF import and export).

Shapes: L MoE layers, k choices per token, E experts.
"""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from moe.errors import ConfigError, InputError
from moe.hf import load_hf_checkpoint, save_hf_checkpoint
from moe.model import Transformer
from moe.moe_layer import MoEStats
from moe.router import TopKRouter
from moe.train import LanguageModel
from moe.train.expert_bias import ExpertBiasUpdate, bias_update
from moe.train.guard import StepGuard

from .test_module import TINY, PatternData, trainer

RATE = 0.01
BIASED = TINY.replace(router_bias_update_rate=RATE)  # 2 MoE layers of 4 experts, top-2


def biases(model) -> torch.Tensor:
    """(L, E) every MoE layer's selection bias."""
    return torch.stack([m.expert_bias for m in model.modules() if isinstance(m, TopKRouter)]).clone()


def stats(counts: list[list[list[int]]]) -> list[MoEStats]:
    """One micro-batch's MoEStats with the given (k, E) assignment counts per layer (nothing else is read)."""
    zero = torch.zeros(())
    return [MoEStats(None, zero, zero, None, zero, assignment_counts=torch.tensor(c)) for c in counts]


def test_update_moves_each_bias_by_the_rate_toward_the_mean_load():
    loads = torch.tensor([[3.0, 1.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 9.0]])
    # Means 2, 2 and 2.25: busier than the mean down, idler up, exactly the mean unchanged.
    expected = [[-RATE, RATE, RATE, -RATE], [0.0, 0.0, 0.0, 0.0], [RATE, RATE, RATE, -RATE]]
    torch.testing.assert_close(bias_update(loads, RATE), torch.tensor(expected))


class SummingStrategy:
    """A strategy of two processes, the other of which counted `other`: what strategy.reduce(sum) returns."""

    def __init__(self, other):
        self.other, self.calls = torch.tensor(other, dtype=torch.float64), 0

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        self.calls += 1
        return tensor + self.other


def test_one_update_per_step_from_all_micro_batches_and_processes_none_for_a_dropped_step():
    module = LanguageModel(BIASED)
    module.configure_model()
    guard, callback = StepGuard(), ExpertBiasUpdate()
    strategy = SummingStrategy([[0, 0, 0, 4], [4, 0, 0, 0]])  # (L, E) the other process's loads
    t = SimpleNamespace(callbacks=[guard, callback], strategy=strategy, global_step=0)
    callback.on_train_start(t, module)

    # Two micro-batches, as training_step adds them: (k, E) counts per layer; loads (summed over k) in the comments.
    module.step_loads.add(stats([[[3, 0, 1, 0], [1, 0, 1, 2]], [[2, 2, 0, 0], [2, 2, 0, 0]]]))  # 4 0 2 2 | 4 4 0 0
    module.step_loads.add(stats([[[0, 2, 1, 1], [0, 1, 1, 2]], [[0, 1, 2, 1], [0, 0, 2, 2]]]))  # 0 3 2 3 | 0 1 4 3
    callback.on_before_optimizer_step(t, module, None)
    # Global loads: layer 0: 4 3 4 5 + 0 0 0 4 = 4 3 4 9, mean 5; layer 1: 4 5 4 3 + 4 0 0 0 = 8 5 4 3, mean 5.
    # (Each micro-batch on its own, or this process alone, would move other experts.)
    expected = torch.tensor([[RATE, RATE, RATE, -RATE], [-RATE, 0.0, RATE, RATE]])
    torch.testing.assert_close(biases(module.model), expected)
    assert strategy.calls == 1  # one collective for the step, all layers together

    # The guard drops the next step (its count of dropped steps grows): the bias stays, its loads are discarded.
    module.step_loads.add(stats([[[8, 0, 0, 0], [0, 8, 0, 0]], [[8, 0, 0, 0], [0, 8, 0, 0]]]))
    guard.skipped_spikes += 1
    callback.on_before_optimizer_step(t, module, None)
    torch.testing.assert_close(biases(module.model), expected)
    assert strategy.calls == 1

    # The step after it counts only its own micro-batch: layer 0 loads 0 0 4 4 + 0 0 0 4 = 0 0 4 8, mean 3.
    module.step_loads.add(stats([[[0, 0, 2, 2], [0, 0, 2, 2]], [[2, 2, 2, 2], [0, 0, 0, 0]]]))
    callback.on_before_optimizer_step(t, module, None)
    expected += torch.tensor([[RATE, RATE, -RATE, -RATE], [-RATE, RATE, RATE, RATE]])  # layer 1: 6 2 2 2, mean 3
    torch.testing.assert_close(biases(module.model), expected)


class CountChoices(pl.Callback):
    """Counts each training forward's choices from the routers' own output (not from MoEStats), and records the
    biases at the end of each optimizer step, before the default callbacks (given ones run first)."""

    def __init__(self):
        self.counts, self.at_step_end, self._step = [], [], 0

    def on_train_start(self, trainer, pl_module):
        routers = [m for m in pl_module.model.modules() if isinstance(m, TopKRouter)]
        self.counts = [[] for _ in routers]
        for layer, router in enumerate(routers):
            router.register_forward_hook(
                lambda module, args, out, layer=layer: self.counts[layer].append(
                    torch.bincount(out.experts.flatten(), minlength=4).double()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.at_step_end.append(biases(pl_module.model))


def expected_biases(counts: list[list[torch.Tensor]], micro_batches: int, start: torch.Tensor) -> list[torch.Tensor]:
    """The bias after each optimizer step, from per-forward (E,) choice counts, in plain Python."""
    bias, after = start.tolist(), []
    for step in range(len(counts[0]) // micro_batches):
        for layer, per_forward in enumerate(counts):
            load = sum(per_forward[step * micro_batches:(step + 1) * micro_batches]).tolist()
            mean = sum(load) / len(load)
            bias[layer] = [b + RATE * ((mean > x) - (mean < x)) for b, x in zip(bias[layer], load)]
        after.append(torch.tensor(bias))
    return after


def test_a_fit_with_accumulation_updates_once_per_step_from_the_chosen_experts(tmp_path):
    torch.manual_seed(0)
    module = LanguageModel(BIASED, warmup_steps=1, total_steps=4)
    count = CountChoices()
    t = trainer(max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1, limit_val_batches=0, callbacks=[count])
    t.fit(module, datamodule=PatternData())
    expected = expected_biases(count.counts, 2, torch.zeros(2, 4))
    assert len(expected) == 3 and expected[-1].abs().max() > 0
    # Every step's update was in the model by the end of its step, for any callback that saves a checkpoint there.
    for got, want in zip(count.at_step_end, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for layer in (0, 1):
        logged = float(t.callback_metrics[f"experts/layer_{layer}/bias_absmax"])
        assert logged == pytest.approx(float(expected[-1][layer].abs().max()))

    # Checkpointed: restored by a load and continued by a resumed fit (one more step, from the saved bias).
    t.save_checkpoint(tmp_path / "step3.ckpt")
    saved = biases(module.model)
    assert torch.equal(biases(LanguageModel.load_from_checkpoint(tmp_path / "step3.ckpt").model), saved)
    count = CountChoices()
    t = trainer(max_steps=4, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[count])
    resumed = LanguageModel(BIASED, warmup_steps=1, total_steps=4)
    t.fit(resumed, datamodule=PatternData(), ckpt_path=tmp_path / "step3.ckpt")
    torch.testing.assert_close(biases(resumed.model), expected_biases(count.counts, 2, saved)[-1], rtol=0, atol=1e-6)


def max_over_mean_after_fit(config) -> float:
    torch.manual_seed(0)
    t = trainer(max_steps=20, log_every_n_steps=10, limit_val_batches=0)
    t.fit(LanguageModel(config, lr=3e-3, warmup_steps=1), datamodule=PatternData())
    return float(t.callback_metrics["experts/max_over_mean"])  # ExpertLoadMonitor's, over steps 11-20


def test_the_bias_alone_balances_the_experts():
    # No load-balancing loss in either run: only the bias can balance.
    unbalanced = max_over_mean_after_fit(TINY.replace(aux_loss_coef=0.0))
    balanced = max_over_mean_after_fit(BIASED.replace(aux_loss_coef=0.0))
    # At the time of writing 1.68 without and 1.06 with.
    assert balanced - 1 < 0.5 * (unbalanced - 1)


def test_a_model_without_the_bias_is_left_alone():
    t = trainer(max_steps=2, log_every_n_steps=1, limit_val_batches=0)
    module = LanguageModel(TINY, warmup_steps=1)
    t.fit(module, datamodule=PatternData())
    assert any(isinstance(c, ExpertBiasUpdate) for c in t.callbacks)  # registered by default, idle
    assert not [n for n, _ in module.model.named_buffers() if "expert_bias" in n]
    assert not [name for name in t.callback_metrics if "bias" in name]


def test_the_update_must_follow_the_guard():
    t = trainer(max_steps=1, limit_val_batches=0, callbacks=[ExpertBiasUpdate(), StepGuard()])
    with pytest.raises(ValueError, match="ExpertBiasUpdate must come after StepGuard"):
        t.fit(LanguageModel(BIASED, warmup_steps=1), datamodule=PatternData())


# ---------------------------------------------------------------------------------------------- loaders
def with_bias(config, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for router in (m for m in model.modules() if isinstance(m, TopKRouter)):
            router.expert_bias.copy_(torch.tensor([0.02, -0.01, 0.0, 0.03]))
    return model


def test_export_refuses_a_nonzero_bias_and_drops_a_zero_one(tmp_path):
    model = with_bias(BIASED.replace(expert_backend="loop"))
    with pytest.raises(InputError) as error:
        save_hf_checkpoint(model, tmp_path / "biased")
    message = str(error.value)
    assert "has no expert selection bias" in message and "route tokens to other experts" in message
    assert "mixtral" in message and "\n" not in message
    assert not (tmp_path / "biased").exists()

    for router in (m for m in model.modules() if isinstance(m, TopKRouter)):
        router.expert_bias.zero_()
    save_hf_checkpoint(model, tmp_path / "zero")
    exported = load_hf_checkpoint(tmp_path / "zero", expert_backend="loop")  # imported as it was: no bias
    assert not [n for n, _ in exported.named_buffers() if "expert_bias" in n]
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(exported(ids).logits, model(ids).logits)


def test_init_from_turns_the_bias_on_from_zero_and_refuses_to_drop_a_nonzero_one(tmp_path):
    torch.manual_seed(0)
    plain = Transformer(TINY)
    save_hf_checkpoint(plain, tmp_path / "hf")
    module = LanguageModel(BIASED, init_from=str(tmp_path / "hf"))  # HF weights, our runtime field turns it on
    module.configure_model()
    assert torch.equal(biases(module.model), torch.zeros(2, 4))
    torch.testing.assert_close(module.model.layers[0].mlp.router.gate.weight, plain.layers[0].mlp.router.gate.weight)

    # Lightning checkpoints of ours: one without the bias, one with a nonzero bias.
    t = trainer(max_steps=1, limit_val_batches=0)
    t.fit(LanguageModel(TINY, warmup_steps=1), datamodule=PatternData())
    t.save_checkpoint(tmp_path / "plain.ckpt")
    module = LanguageModel(BIASED, init_from=str(tmp_path / "plain.ckpt"))
    module.configure_model()
    assert torch.equal(biases(module.model), torch.zeros(2, 4))

    t = trainer(max_steps=2, limit_val_batches=0)
    t.fit(LanguageModel(BIASED, warmup_steps=1), datamodule=PatternData())
    t.save_checkpoint(tmp_path / "biased.ckpt")
    trained = biases(t.lightning_module.model)
    assert trained.abs().max() > 0
    continued = LanguageModel(BIASED, init_from=str(tmp_path / "biased.ckpt"))
    continued.configure_model()
    assert torch.equal(biases(continued.model), trained)
    with pytest.raises(ConfigError, match="ModelConfig.router_bias_update_rate=None turns off") as error:
        LanguageModel(TINY, init_from=str(tmp_path / "biased.ckpt")).configure_model()
    assert error.value.field == "router_bias_update_rate"
