"""PAD-Net training hooks (plain loop) and the Hugging Face Trainer callback, end to end on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.train.pad_hooks import PadTrainingHooks, dynamic_ratio, temperature_at
from padnet.layers import DynamicConv2d, MoEFeedForward, collect_aux_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_temperature_anneal_and_plain_loop_hooks():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), DynamicConv2d(4, 4, 3, num_kernels=2))
    hooks = PadTrainingHooks(temperature=(30.0, 1.0, 10))
    for step, expected in [(0, 30.0), (5, 15.5), (10, 1.0), (50, 1.0)]:
        hooks.step_begin(conv, step)
        assert conv[1].temperature == pytest.approx(expected)
        assert temperature_at(step, 30.0, 1.0, 10) == pytest.approx(expected)
    assert hooks.metrics(conv)["padnet/temperature"] == pytest.approx(1.0)


def test_plain_loop_aux_loss_bias_update_partition_and_step_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), MoEFeedForward(8, 12, num_experts=4, top_k=2, bias_balancing=True,
                                                          bias_update_rate=0.01, z_loss_coef=1e-3))
    data = [(torch.randn(16, 6), torch.randn(16, 8)) for _ in range(4)]
    seen = []
    hooks = PadTrainingHooks(partition_step=3, partition_kwargs={
        "ratio": 0.25, "batches": data[:2], "loss_fn": F.mse_loss, "iterations": 1, "warn_symmetric": False},
        step_hooks=[lambda m, s: seen.append(s)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(4):
        x, y = data[step]
        hooks.step_begin(model, step)
        task = F.mse_loss(model(x), y)
        loss = hooks.loss(model, task)
        torch.testing.assert_close(loss, task + collect_aux_loss(model))
        assert float((loss - task).detach()) > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        hooks.step_end(model, step + 1)
        if step == 1:
            m = hooks.metrics(model)
            assert m["padnet/dynamic_ratio"] == 1.0
            assert {"padnet/moe/load_max_over_mean", "padnet/moe/z_loss_avg", "padnet/moe/expert_bias_abs_avg"} <= set(m)
    assert seen == [1, 2, 3, 4]
    assert hooks.partition_report is not None
    assert dynamic_ratio(model) == pytest.approx(0.25, abs=1e-3)
    assert model[1].expert_bias.abs().sum() > 0


def test_hooks_bad_input():
    with pytest.raises(ValueError, match="temperature must be"):
        PadTrainingHooks(temperature=(1.0, 2.0))
    with pytest.raises(ValueError, match="start > 0"):
        PadTrainingHooks(temperature=(0.0, 1.0, 5))
    with pytest.raises(ValueError, match="partition_step needs"):
        PadTrainingHooks(partition_step=3)
    with pytest.raises(ValueError, match="partition_step must be an int"):
        PadTrainingHooks(partition_step=-1, partition=lambda m: None)
    with pytest.raises(TypeError, match="step_hooks"):
        PadTrainingHooks(step_hooks=[3])


def _moe_regression(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), MoEFeedForward(8, 12, num_experts=4, top_k=2))
    data = [(torch.randn(16, 6), torch.randn(16, 8)) for _ in range(4)]
    return model, data


def test_plain_loop_drives_learned_gates_to_hardening():
    model, data = _moe_regression()
    gates = padnet.ModeGates(model, target_ratio=0.25)
    hooks = PadTrainingHooks(aux_loss=False, gates=gates, harden_step=5, gate_lr=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gate_ids = {id(p) for p in gates.gate_parameters()}
    assert any(id(p) in gate_ids for g in opt.param_groups for p in g["params"])
    hooks.attach_optimizer(opt)
    assert not any(id(p) in gate_ids for g in opt.param_groups for p in g["params"])  # own Adam now
    before = [p.detach().clone() for p in gates.gate_parameters()]
    for step in range(7):
        x, y = data[step % 4]
        hooks.step_begin(model, step)
        task = F.mse_loss(model(x), y)
        loss = hooks.loss(model, task)
        if step < 5:  # the budget penalty is part of the loss until hardening
            torch.testing.assert_close(loss - task, gates.penalty().detach(), rtol=1e-5, atol=1e-7)
            assert "padnet/gate_expected_ratio" in hooks.metrics(model)
        else:
            assert loss is task
        opt.zero_grad()
        loss.backward()
        opt.step()
        hooks.optimizer_step()
        hooks.step_end(model, step + 1)
        if step == 0:
            assert any(not torch.equal(a, b) for a, b in zip(before, gates.gate_parameters()))  # gates learn
    assert hooks.harden_report is not None and hooks.harden_report["step"] == 5
    assert hooks.gate_optimizer is None and not hooks.gates_active
    assert dynamic_ratio(model) == pytest.approx(0.25, abs=0.02)


def test_plain_loop_steps_a_mode_scheduler_and_logs_moved_entries():
    model, data = _moe_regression()
    padnet.partition_(model, ratio=0.5, batches=data[:2], loss_fn=F.mse_loss, iterations=1, warn_symmetric=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = padnet.ModeScheduler(model, opt, total_steps=12, update_interval=3, fraction=0.3,
                                 repartition="magnitude", growth="random", prune=None)
    hooks = PadTrainingHooks(mode_scheduler=sched)
    for step in range(8):
        x, y = data[step % 4]
        hooks.step_begin(model, step)
        loss = hooks.loss(model, F.mse_loss(model(x), y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        hooks.step_end(model, step + 1)
    assert [r["step"] for r in hooks.mode_updates] == [3, 6]
    moved = hooks.metrics(model)["padnet/mode_entries_moved"]
    assert moved == sum(r["entries_moved"] for r in hooks.mode_updates) > 0
    assert dynamic_ratio(model) == pytest.approx(0.5, abs=1e-3)  # re-partition keeps kappa
    assert hooks.metrics(model)["padnet/mode_entries_moved"] == 0.0  # reset per log window


def test_hooks_bad_gate_and_scheduler_options():
    model, _ = _moe_regression()
    with pytest.raises(TypeError, match="mode_scheduler must be"):
        PadTrainingHooks(mode_scheduler=object())
    with pytest.raises(TypeError, match="gates must be"):
        PadTrainingHooks(gates=object(), harden_step=3)
    gates = padnet.ModeGates(model, target_ratio=0.25)
    with pytest.raises(ValueError, match="harden_step"):
        PadTrainingHooks(gates=gates)
    with pytest.raises(ValueError, match="gate_lr"):
        PadTrainingHooks(gates=gates, harden_step=3, gate_lr=float("nan"))
    with pytest.raises(ValueError, match="harden_step is given but gates is None"):
        PadTrainingHooks(harden_step=3)
    hooks = PadTrainingHooks(gates=gates, harden_step=3)
    with pytest.raises(RuntimeError, match="attach_optimizer"):
        hooks.step_begin(model, 0)


# ----------------------------------------------------------------------------- HF Trainer


transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n=32, length=8, vocab=60, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _tiny_llama_classifier():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=60, num_labels=2, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg)


def test_hf_trainer_end_to_end_with_the_callback(tmp_path):
    from padnet.train.hf_callback import PadNetCallback, add_padnet_callback

    model = _tiny_llama_classifier()
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(routing="sigmoid", bias_balancing=True,
                                                                   bias_update_rate=0.01, z_loss_coef=1e-3)))
    moes = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert len(moes) == 2
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, logging_steps=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Dataset())
    cb = add_padnet_callback(trainer, partition_step=4, partition_batches=2,
                             partition_kwargs={"ratio": 0.5, "iterations": 1, "warn_symmetric": False})
    assert isinstance(cb, PadNetCallback) and trainer.callback_handler.callbacks[0] is cb

    # the forward hook adds exactly the auxiliary losses to outputs.loss (training mode only)
    batch = {k: torch.stack([_Dataset()[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    model.train()
    cb.on_train_begin(args, trainer.state, trainer.control, model=model)
    with_aux = model(**batch).loss
    aux = collect_aux_loss(model)
    cb._handle.remove()
    cb._handle = None
    torch.testing.assert_close(with_aux - model(**batch).loss, aux, rtol=1e-4, atol=1e-6)

    result = trainer.train()
    assert result.global_step == 6
    assert cb._handle is None  # hook removed at train end
    assert cb.hooks.partition_report is not None
    assert dynamic_ratio(model) == pytest.approx(0.5, abs=1e-3)
    assert sum(float(m.expert_bias.abs().sum()) for m in moes) > 0  # bias balancing ran ...
    assert all(float(m.load_since_update.sum()) == 0 for m in moes)  # ... after every step
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 6]
    assert all("padnet/moe/load_max_over_mean" in h and "padnet/moe/z_loss_avg" in h for h in logs)
    assert logs[0]["padnet/dynamic_ratio"] == 1.0 and logs[-1]["padnet/dynamic_ratio"] == pytest.approx(0.5, abs=1e-3)


def test_hf_trainer_drives_learned_gates(tmp_path):
    from padnet.train.hf_callback import add_padnet_callback

    model = _tiny_llama_classifier()
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig()))
    gates = padnet.ModeGates(model, target_ratio=0.5)
    gate_ids = {id(p) for p in gates.gate_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, logging_steps=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Dataset())
    cb = add_padnet_callback(trainer, gates=gates, harden_step=4, gate_lr=0.1)
    trainer.train()
    assert not any(id(p) in gate_ids for g in trainer.optimizer.param_groups for p in g["params"])
    assert cb.hooks.harden_report is not None and cb.hooks.harden_report["step"] == 4
    assert dynamic_ratio(model) == pytest.approx(0.5, abs=0.02)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "padnet/gate_expected_ratio" in logs[0] and "padnet/gate_expected_ratio" not in logs[-1]
    assert logs[0]["padnet/gate_expected_ratio"] != logs[1]["padnet/gate_expected_ratio"]  # the gates learned


def test_add_padnet_callback_rejects_non_trainers_and_bad_options():
    from padnet.train.hf_callback import PadNetCallback, add_padnet_callback

    with pytest.raises(TypeError, match="expects a transformers.Trainer"):
        add_padnet_callback(object())
    with pytest.raises(ValueError, match="partition_batches"):
        PadNetCallback(partition_batches=0)
