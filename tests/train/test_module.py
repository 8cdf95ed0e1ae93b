"""The LightningModule: objective, schedule inside a Trainer, configure_model, init_from, checkpointing, logs."""

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from moe import get_preset
from moe.hf import save_hf_checkpoint
from moe.train import LanguageModel, throughput
from moe.train.callbacks import GenerateSample
from moe.train.routing_metrics import ExpertLoadMonitor
from moe.train.schedule import warmup_cosine
from moe.train.throughput import ThroughputMeter, ThroughputMonitor

TINY = get_preset("tiny-moe", vocab_size=64, d_model=64, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=32,
                  n_experts=4)


class PatternData(pl.LightningDataModule):
    """Sequences of a fixed random token cycle at random phases: learnable, so a short fit must lower the loss."""

    def __init__(self, seq_len=32, batch_size=8, n=256, vocab=64, max_id=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        cycle = torch.randint(0, vocab, (13,), generator=g)
        starts = torch.randint(0, 13, (n,), generator=g)
        idx = (starts[:, None] + torch.arange(seq_len + 1)) % 13
        self.tokens = cycle[idx]
        if max_id is not None:
            self.tokens[0, 0] = max_id
        self.batch_size, self.n_vocab = batch_size, vocab
        # What GenerateSample reads: prompts, a tokenizer and EOS.
        self.prompts, self.eos_id = ["ab"], None

    def encode(self, text):
        return [ord(c) % 64 for c in text]

    def decode(self, ids):
        return "".join(chr(48 + i) for i in ids)

    def max_token_id(self):
        return int(self.tokens.max())

    def _loader(self, rows):
        items = [{"input_ids": r[:-1], "labels": r[1:]} for r in rows]
        return DataLoader(items, batch_size=self.batch_size)

    def train_dataloader(self):
        return self._loader(self.tokens)

    def val_dataloader(self):
        return self._loader(self.tokens[:16])


def trainer(**kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def test_objective_is_cross_entropy_plus_weighted_router_losses():
    module = LanguageModel(TINY.replace(aux_loss_coef=0.3, z_loss_coef=0.05))
    module.configure_model()
    batch = next(iter(PatternData().train_dataloader()))
    out = module.model(batch["input_ids"])
    loss = module.objective(out, batch["labels"])["loss"]
    ce = F.cross_entropy(out.logits.reshape(-1, 64), batch["labels"].reshape(-1))
    aux = torch.stack([s.load_balancing_loss for s in out.moe]).mean()
    z = torch.stack([s.z_loss for s in out.moe]).mean()
    torch.testing.assert_close(loss, ce + 0.3 * aux + 0.05 * z)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: bf16 logits, cross-entropy in fp32
        out = module.model(batch["input_ids"])
        parts = module.objective(out, batch["labels"])
    assert out.logits.dtype == torch.bfloat16 and parts["ce"].dtype == parts["loss"].dtype == torch.float32
    module.model.to(torch.bfloat16)  # bf16-true: no autocast to upcast the cross-entropy
    assert module.objective(module.model(batch["input_ids"]), batch["labels"])["ce"].dtype == torch.float32


def test_configure_model_twice_keeps_the_model():
    module = LanguageModel(TINY)
    module.configure_model()
    first = module.model
    module.configure_model()
    assert module.model is first


class RecordLR(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_learning_rate_in_a_trainer_follows_the_schedule_per_optimizer_step():
    record = RecordLR()
    module = LanguageModel(TINY, lr=1e-2, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    t = trainer(max_steps=12, accumulate_grad_batches=2, callbacks=[record], limit_val_batches=0)
    t.fit(module, datamodule=PatternData())
    # Two micro-batches per optimizer step: the rate changes only when the optimizer steps.
    per_step = record.lrs[::2]
    assert record.lrs[1::2] == per_step
    assert per_step == pytest.approx([1e-2 * warmup_cosine(s, 4, 12, 0.1) for s in range(12)])
    # Weight decay groups reached the optimizer.
    decays = sorted(g["weight_decay"] for g in t.optimizers[0].param_groups)
    assert decays == [0.0, 0.1]


def test_short_fit_lowers_the_loss_and_logs():
    torch.manual_seed(0)
    module = LanguageModel(TINY, lr=3e-3, warmup_steps=5)
    data = PatternData()
    t = trainer(max_steps=40, gradient_clip_val=1.0, val_check_interval=40, check_val_every_n_epoch=None,
                log_every_n_steps=5)
    t.validate(module, datamodule=data)
    before = float(t.callback_metrics["val/loss"])
    t.fit(module, datamodule=data)
    after = float(t.callback_metrics["val/loss"])
    assert before > math.log(64) - 0.5  # starts near uniform
    assert after < before - 1.0
    assert float(t.callback_metrics["val/ppl"]) == pytest.approx(math.exp(after), rel=1e-5)
    for name in ("train/grad_norm", "train/lr", "train/aux_loss", "train/z_loss", "perf/tokens_per_s",
                 "train/tokens_seen", "experts/max_over_mean", "experts/idle", "experts/layer_1/idle"):
        assert name in t.callback_metrics, name
    assert float(t.callback_metrics["train/tokens_seen"]) == 40 * 8 * 32
    # The rate of the last update (step 39), as the optimizer used it.
    assert float(t.callback_metrics["train/lr"]) == pytest.approx(3e-3 * warmup_cosine(39, 5, 40, 0.1))


def test_grad_norm_is_logged_before_clipping():
    t = trainer(max_steps=1, gradient_clip_val=1e-3, log_every_n_steps=1, limit_val_batches=0)
    t.fit(LanguageModel(TINY, warmup_steps=1), datamodule=PatternData())
    assert float(t.callback_metrics["train/grad_norm"]) > 0.1


def test_clipping_by_value_bounds_every_gradient_entry():
    """gradient_clip_algorithm='value', which moe/train/clipping.py applies itself like the norm."""
    seen = []

    class LargestGradient(pl.Callback):
        def on_train_start(self, trainer, module):
            trainer.optimizers[0].register_step_post_hook(lambda *_: seen.append(
                max(p.grad.abs().max().item() for p in module.parameters() if p.grad is not None)))

    t = trainer(max_steps=2, gradient_clip_val=1e-3, gradient_clip_algorithm="value", limit_val_batches=0,
                callbacks=[LargestGradient()])
    t.fit(LanguageModel(TINY, warmup_steps=1), datamodule=PatternData())
    assert len(seen) == 2 and max(seen) == pytest.approx(1e-3, rel=1e-6)  # float32 1e-3: the bound binds


def test_validation_loss_is_the_token_mean_over_the_whole_set():
    module = LanguageModel(TINY)
    data = PatternData(batch_size=6)  # 16 validation rows: batches of 6, 6 and 4
    t = trainer()
    t.validate(module, datamodule=data)
    rows = data.tokens[:16]
    with torch.no_grad():
        full = F.cross_entropy(module.model(rows[:, :-1]).logits.flatten(0, 1), rows[:, 1:].flatten())
    assert float(t.callback_metrics["val/loss"]) == pytest.approx(float(full), rel=1e-6)


def test_sampling_is_seeded():
    module = LanguageModel(TINY)
    module.configure_model()
    module.sampling.temperature, module.sampling.top_k, module.sampling.top_p = 1.0, None, None
    prompt = torch.tensor([1, 2, 3])
    first = module.complete(prompt, eos_id=None)
    assert module.complete(prompt, eos_id=None) == first
    module.sampling.seed = 1
    assert module.complete(prompt, eos_id=None) != first


def test_expert_load_logs_match_the_counts():
    module = LanguageModel(TINY)
    module.configure_model()
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    tokens = torch.tensor([[5.0, 0.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    ExpertLoadMonitor().log_load(module, tokens)
    assert logged["experts/layer_0/max_over_mean"] == pytest.approx(5 / 2)
    assert logged["experts/layer_0/idle"] == 2 and logged["experts/layer_1/idle"] == 0
    assert logged["experts/layer_1/max_over_mean"] == 1.0
    assert logged["experts/idle"] == 2 and logged["experts/max_over_mean"] == pytest.approx(2.5)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = LanguageModel(TINY, activation_checkpointing=checkpointing)
        module.configure_model()
        batch = next(iter(PatternData().train_dataloader()))
        out = module.model(batch["input_ids"])
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten()) + out.aux_loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters()})
        assert [n for n, _ in module.model.named_parameters()] == list(grads[0])  # names unchanged
    # The backward pass recomputed the block: its attention ran twice.
    calls = []
    module.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    module.objective(module.model(batch["input_ids"]), batch["labels"])["loss"].backward()
    assert len(calls) == 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_init_from_hf_directory_and_from_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = LanguageModel(TINY)
    source.configure_model()
    save_hf_checkpoint(source.model, tmp_path / "hf")
    # The architecture comes from the checkpoint; only runtime fields of the given config apply.
    module = LanguageModel(get_preset("tiny-dense", expert_backend="loop"), init_from=str(tmp_path / "hf"),
                           warmup_steps=1)
    module.configure_model()
    assert module.model_config.n_experts == 4 and module.model_config.expert_backend == "loop"
    for (name, p), q in zip(module.model.state_dict().items(), source.model.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)

    t = trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path, enable_checkpointing=True)
    t.fit(module, datamodule=PatternData())
    ckpt = tmp_path / "run.ckpt"
    t.save_checkpoint(ckpt)
    resumed = LanguageModel(TINY, init_from=str(ckpt))
    resumed.configure_model()
    for (name, p), q in zip(resumed.model.state_dict().items(), module.model.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_init_from_missing_path_names_the_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="LanguageModel.init_from=.*nowhere"):
        LanguageModel(TINY, init_from=str(tmp_path / "nowhere"))


def test_token_ids_beyond_the_vocabulary_fail_at_setup():
    module = LanguageModel(TINY)
    t = trainer(max_steps=1)
    with pytest.raises(ValueError, match="token id 64, beyond the model's vocab_size=64"):
        t.fit(module, datamodule=PatternData(max_id=64))


@pytest.mark.parametrize("kwargs,field", [
    (dict(schedule="linear"), "LanguageModel.schedule"),
    (dict(decay_shape="exp"), "LanguageModel.decay_shape"),
    (dict(min_lr_ratio=2.0), "LanguageModel.min_lr_ratio"),
    (dict(warmup_steps=-1), "LanguageModel.warmup_steps"),
    (dict(default_callbacks=["Throughput"]), "LanguageModel.default_callbacks"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LanguageModel(TINY, **kwargs)


def test_warmup_longer_than_the_run_is_refused():
    module = LanguageModel(TINY, warmup_steps=100)
    with pytest.raises(ValueError, match="warmup_steps=100 exceeds the 5 optimizer steps"):
        trainer(max_steps=5).fit(module, datamodule=PatternData())


@pytest.mark.parametrize("args,message", [
    (["--model.warmup_steps", "100"], "--model.warmup_steps=100 exceeds the 6 optimizer steps"),
    # -1 is Lightning's "no step limit": with no max_epochs either, it trains for 1000 epochs, over which a
    # cosine schedule would barely leave its peak.
    (["--trainer.max_steps", "-1"], "the cosine schedule needs the run's length: set --trainer.max_steps"),
])
def test_a_schedule_that_cannot_fit_the_run_is_one_line_through_the_command_line(workdir, capsys, args, message):
    import cli

    from ..cli_runs import tiny_run_args

    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *tiny_run_args(workdir), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message in err and "Traceback" not in err
    assert not list(workdir.rglob("*.ckpt"))


def test_a_run_without_a_step_limit_takes_its_schedule_from_max_epochs(workdir):
    import cli

    from ..cli_runs import tiny_run_args

    parsed = cli.build_cli([*tiny_run_args(workdir), "--trainer.max_steps", "-1", "--trainer.max_epochs", "2",
                            "--trainer.limit_train_batches", "3"], run=False)
    parsed.trainer.fit(parsed.model, datamodule=parsed.datamodule)
    assert parsed.model.schedule_length.total == parsed.trainer.global_step == 2 * 3


def test_compiled_blocks_match_eager():
    config = TINY.replace(n_layers=1)
    eager, compiled = LanguageModel(config), LanguageModel(config, compile=True)
    eager.configure_model()
    compiled.configure_model()
    compiled.model.load_state_dict(eager.model.state_dict())
    assert all(block._compiled_call_impl is not None for block in compiled.model.layers)
    batch = next(iter(PatternData().train_dataloader()))
    results = []
    for module in (eager, compiled):
        out = module.model(batch["input_ids"])
        module.objective(out, batch["labels"])["loss"].backward()
        results.append((out.logits, [p.grad for p in module.model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for g_compiled, g_eager in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-6)


def test_load_from_checkpoint_without_the_init_source_or_unpickling(tmp_path):
    trainer_ = trainer(max_steps=1, limit_val_batches=0)
    trainer_.fit(LanguageModel(TINY, warmup_steps=1), datamodule=PatternData())
    trainer_.save_checkpoint(tmp_path / "init.ckpt")
    module = LanguageModel(get_preset("tiny-dense"), init_from=str(tmp_path / "init.ckpt"), warmup_steps=1)
    t = trainer(max_steps=2, limit_val_batches=0)
    t.fit(module, datamodule=PatternData())
    t.save_checkpoint(tmp_path / "run.ckpt")
    (tmp_path / "init.ckpt").unlink()  # the run's checkpoint holds the weights and the resolved architecture
    assert torch.load(tmp_path / "run.ckpt", weights_only=True)["hyper_parameters"]["init_from"] is None
    loaded = LanguageModel.load_from_checkpoint(tmp_path / "run.ckpt")  # torch's default weights_only=True
    assert loaded.model_config == module.model_config and loaded.model_config.n_experts == 4
    for (name, p), q in zip(loaded.model.state_dict().items(), module.model.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


class CaptureExpertLoad(ExpertLoadMonitor):
    def __init__(self):
        super().__init__()
        self.reports = []

    def log_load(self, pl_module, tokens):
        self.reports.append(tokens.clone())
        super().log_load(pl_module, tokens)


def test_expert_load_and_tokens_cover_every_micro_batch_under_accumulation():
    module = LanguageModel(TINY, warmup_steps=1)
    capture = CaptureExpertLoad()  # replaces the default ExpertLoadMonitor
    t = trainer(max_steps=4, accumulate_grad_batches=2, log_every_n_steps=2, limit_val_batches=0, callbacks=[capture])
    t.fit(module, datamodule=PatternData())
    # One report per two optimizer steps, each counting the top-2 assignments of 2 steps x 2 micro-batches.
    assert len(capture.reports) == 2
    for tokens in capture.reports:
        assert tokens.sum(dim=1).tolist() == [2 * 2 * 8 * 32 * TINY.top_k] * TINY.n_layers
    assert float(t.callback_metrics["train/tokens_seen"]) == 4 * 2 * 8 * 32


def test_tokens_seen_continues_after_a_resume(tmp_path):
    t = trainer(max_steps=2, log_every_n_steps=2, limit_val_batches=0)
    t.fit(LanguageModel(TINY, warmup_steps=1), datamodule=PatternData())
    t.save_checkpoint(tmp_path / "step2.ckpt")
    t = trainer(max_steps=4, log_every_n_steps=2, limit_val_batches=0)
    t.fit(LanguageModel(TINY, warmup_steps=1), datamodule=PatternData(), ckpt_path=tmp_path / "step2.ckpt")
    assert float(t.callback_metrics["train/tokens_seen"]) == 4 * 8 * 32


def test_validation_time_is_left_out_of_the_throughput_window(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: now[0])
    monitor = ThroughputMonitor()
    monitor.meter = ThroughputMeter(1e9, world_size=1, peak_tflops=None)
    monitor.meter.start()
    monitor.meter.update(1000)
    now[0] += 1.0  # training
    monitor.on_validation_start(None, None)
    now[0] += 9.0  # validating
    monitor.on_validation_end(None, None)
    now[0] += 1.0  # training
    assert monitor.meter.report()["tokens_per_s"] == pytest.approx(1000 / 2.0)


def test_samples_after_optimizer_steps_and_once_at_the_end(capsys):
    module = LanguageModel(TINY, warmup_steps=1)
    module.sampling.max_new_tokens = 2
    t = trainer(max_steps=4, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[GenerateSample(2)])
    t.fit(module, datamodule=PatternData())
    titles = [line for line in capsys.readouterr().out.splitlines() if line.startswith("----- sample")]
    assert titles == ["----- sample at step 2 -----", "----- sample after 4 steps -----"]


def test_defaults_are_the_llama_recipe():
    # Touvron et al. 2023, section 2.2: AdamW (0.9, 0.95), eps 1e-8 (our choice, torch's default), weight decay
    # 0.1, 2000 warmup steps, cosine decay to 10% of the peak.
    defaults = {name: p.default for name, p in inspect.signature(LanguageModel).parameters.items()}
    assert defaults["betas"] == (0.9, 0.95) and defaults["eps"] == 1e-8 and defaults["weight_decay"] == 0.1
    assert defaults["warmup_steps"] == 2000 and defaults["schedule"] == "cosine" and defaults["min_lr_ratio"] == 0.1


def test_ddp_reduces_loss_expert_load_and_tokens_over_processes(tmp_path):
    """Two CPU processes (gloo): the validation loss is the one of the whole validation set, the expert load and
    tokens seen count both processes' batches, and no metric is left unsynchronised."""
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(Path(__file__).parent / "ddp_worker.py"), str(out)], cwd=tmp_path, env=env,
                   check=True, timeout=300, capture_output=True)
    seen = json.loads(out.read_text())
    assert seen["val_loss"] == pytest.approx(seen["full_val_loss"], rel=1e-5)
    tokens_per_step = 2 * 4 * 32  # processes x batch x sequence
    assert seen["tokens_seen"] == 4 * tokens_per_step
    assert seen["expert_tokens"] == [2 * tokens_per_step * TINY.top_k * TINY.n_layers] * 2  # two reports
    assert not [w for w in seen["warnings"] if "sync_dist" in w]
