"""ModeScheduler: exact counts, schedule, criteria, transitions, resume, distributed agreement, bad input."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from padnet.transforms import compact_
from padnet.layers import DynamicConv2d, MoEFeedForward, pad_layers
from padnet.transforms.partition import GroupStats, get_criterion, list_criteria, partition_
from padnet.transforms.scheduler import ModeScheduler
from padnet.transforms.sparsity import effective_view

from gloo_ranks import run_on_gloo_ranks

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = DynamicConv2d(3, 6, 3, padding=1, bias=True, num_kernels=3, reduction=1, dtype=dtype)
        self.moe = MoEFeedForward(6, 10, num_experts=3, top_k=2, dtype=dtype)
        self.head = nn.Linear(6, 4, dtype=dtype)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(h + self.moe(h))


def make_batches(n=4, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, 4, (4,), generator=g))
            for _ in range(n)]


def build(density=0.5, ratio=0.3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Net(dtype)
    partition_(model, make_batches(dtype=dtype), F.cross_entropy, ratio=ratio, density=density, iterations=2)
    return model


def layer_counts(model):
    return {n: (sum(int(g.mask.sum()) for g in l.mode_groups()), sum(g.num_live() for g in l.mode_groups()))
            for n, l in pad_layers(model)}


def masks(model):
    return {f"{n}:{g.name}": (g.mask.detach().clone(), g.live_or_ones().detach().clone())
            for n, l in pad_layers(model) for g in l.mode_groups()}


def train(model, opt, sched, steps, batches, start=0):
    records = []
    for t in range(start, start + steps):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        before = layer_counts(model)
        rec = sched.step()
        if rec is not None:
            assert layer_counts(model) == before  # exact per-layer kappa and density
            records.append(rec)
    return records


def probe_data(batches):
    return lambda step: [batches[step % len(batches)]]


@pytest.mark.parametrize("prune, regrow, repartition, growth", [
    ("magnitude", "gradient", "magnitude", "gradient"),
    ("set_signed", "random", "taylor", "random"),
    ("snip", "momentum", "snip", "momentum"),
    ("gradstep", "gradient", "set", "gradient"),
])
def test_per_layer_kappa_and_density_exact_at_every_update(prune, regrow, repartition, growth):
    model = build()
    batches = make_batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = ModeScheduler(model, opt, total_steps=40, update_interval=5, prune=prune, regrow=regrow,
                          repartition=repartition, growth=growth, data=probe_data(batches), loss_fn=F.cross_entropy)
    start = masks(model)
    records = train(model, opt, sched, 40, batches)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25]  # end_step = 30 (75 %)
    assert records[0]["entries_moved"] > 0
    for r in records:
        for v in r["layers"].values():
            assert v["pruned"] == v["regrown"] and v["demoted"] == v["promoted"]
    assert any(not torch.equal(a[0], masks(model)[k][0]) for k, a in start.items())
    for _, layer in pad_layers(model):  # invariant: pruned entries hold zeros, never dynamic
        for g in layer.mode_groups():
            dead = g.live < 0.5
            assert g.static[dead].abs().sum() == 0 and g.dynamic[:, dead].abs().sum() == 0
            assert not bool((g.mask.bool() & dead).any())


def test_schedule_is_cosine_decayed_and_counts_follow_it():
    model = build()
    sched = ModeScheduler(model, None, total_steps=400, update_interval=100, fraction=0.3,
                          data=probe_data(make_batches()), loss_fn=F.cross_entropy)
    assert sched.end_step == 300
    for t in (0, 100, 150, 299):
        assert math.isclose(sched.fraction_at(t), 0.3 * 0.5 * (1 + math.cos(math.pi * t / 300)))
    assert sched.fraction_at(300) == 0.0
    dyn = {n: c[0] for n, c in layer_counts(model).items()}
    sched.step_count = 99
    rec = sched.step()
    frac = sched.fraction_at(100)
    for name, v in rec["layers"].items():
        assert v["demoted"] == math.floor(frac * dyn[name] + 0.5 + 1e-9)
        assert 0.0 <= v["dynamic_overlap"] <= 1.0
        assert math.isclose(v["dynamic_overlap"], 1 - v["demoted"] / dyn[name])


def test_global_scope_keeps_global_counts_and_may_reallocate():
    model = build()
    batches = make_batches()
    total_before = [sum(c) for c in zip(*layer_counts(model).values())]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = ModeScheduler(model, opt, total_steps=20, update_interval=5, prune="magnitude", scope="global",
                          data=probe_data(batches), loss_fn=F.cross_entropy)
    for t in range(15):
        x, y = batches[t % 4]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        assert [sum(c) for c in zip(*layer_counts(model).values())] == total_before


def test_regrown_entries_start_at_zero_with_reset_optimizer_state():
    model = build(dtype=torch.float64)
    batches = make_batches(dtype=torch.float64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = ModeScheduler(model, opt, total_steps=20, update_interval=5, prune="magnitude", repartition=None,
                          data=probe_data(batches), loss_fn=F.cross_entropy)
    before = masks(model)
    train(model, opt, sched, 5, batches)
    grown_any = False
    for n, layer in pad_layers(model):
        for g in layer.mode_groups():
            old_live = before[f"{n}:{g.name}"][1] > 0.5
            grown = (g.live > 0.5) & ~old_live
            pruned = old_live & (g.live < 0.5)
            moved = grown | pruned
            grown_any |= bool(grown.any())
            assert g.static[moved].abs().sum() == 0
            assert g.dynamic[:, moved].abs().sum() == 0
            for p, sel in ((g.static, moved), (g.dynamic, moved.unsqueeze(0).expand_as(g.dynamic))):
                for v in opt.state[p].values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        assert v[sel].abs().sum() == 0
    assert grown_any


def test_repartition_moves_are_function_preserving_for_promotion():
    """Promotion (static -> dynamic) is exact with softmax routing; the whole update changes the output
    only through demotion (routing-mean fold), far less than a plain mask flip."""
    model = build(dtype=torch.float64, density=1.0).eval()
    x = make_batches(1, seed=5, dtype=torch.float64)[0][0]
    sched = ModeScheduler(model, None, total_steps=10, update_interval=1, fraction=0.5, repartition="magnitude",
                          growth="gradient", data=probe_data(make_batches(dtype=torch.float64)),
                          loss_fn=F.cross_entropy)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(x)
    sched.step()
    with torch.no_grad():
        out = model(x)
    for (_, a), (_, b) in zip(pad_layers(model), pad_layers(plain)):
        for ga, gb in zip(a.mode_groups(), b.mode_groups()):
            b.set_mode_mask(gb.name, ga.mask)
    with torch.no_grad():
        flipped = plain(x)
    assert (out - ref).norm() < 0.5 * (flipped - ref).norm()
    with torch.no_grad():  # promotion only, through the scheduler's adapter to the transitions: exact
        g = model.conv.mode_groups()[0]
        static = (g.mask < 0.5).nonzero()[:3]
        new = g.mask.clone()
        new[tuple(static.t())] = 1.0
        before = model(x)
        from padnet.transforms.scheduler import apply_mode_transitions

        apply_mode_transitions(model, {("conv", "weight"): new}, None, True)
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-12)


def test_resume_mid_schedule_is_bit_exact():
    batches = make_batches()

    def fresh():
        model = build()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = ModeScheduler(model, opt, total_steps=40, update_interval=5, prune="magnitude", regrow="random",
                              repartition="magnitude", growth="momentum", data=probe_data(batches),
                              loss_fn=F.cross_entropy, seed=3)
        return model, opt, sched

    model, opt, sched = fresh()
    train(model, opt, sched, 30, batches)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, sched = fresh()
    train(model, opt, sched, 12, batches)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))
    model2, opt2, sched2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert sched2.step_count == 12 and len(sched2.history) == 2
    train(model2, opt2, sched2, 18, batches, start=12)
    resumed = model2.state_dict()
    assert set(resumed) == set(straight)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    with pytest.raises(ValueError, match="settings differ"):
        ModeScheduler(model2, opt2, total_steps=40, update_interval=7, prune="magnitude", regrow="random",
                      data=probe_data(batches), loss_fn=F.cross_entropy).load_state_dict(saved[2])


def test_criteria_formulas_on_the_effective_view():
    torch.manual_seed(0)
    layer = DynamicConv2d(2, 3, 3, num_kernels=2, dtype=torch.float64)
    g = layer.mode_groups()[0]
    w = torch.randn(g.shape, dtype=torch.float64)
    w.view(-1)[:3] = 0.0
    grad = torch.randn(g.shape, dtype=torch.float64)
    view = effective_view(g, w, grad)
    one = torch.ones((), dtype=torch.float64)
    st = GroupStats("l", "weight", one, one, mask_grad=w * grad, dynamic_grad=grad.unsqueeze(0),
                    static_grad=torch.zeros_like(grad), num_batches=1, generator=torch.Generator().manual_seed(0))
    expect = {
        "magnitude": w.abs(), "mest": w.abs() + 0.1 * grad.abs(), "snip": (w * grad).abs(),
        "sensitivity": grad.abs() / (w.abs() + 1e-12), "reversed_sensitivity": w.abs() / (grad.abs() + 1e-12),
        "taylor2": (w * grad) ** 2, "taylor": (w * grad).abs(), "gradstep": (w - grad).abs(),
        "gradient": grad.abs(), "momentum": grad.abs(), "set": w.abs(),
    }
    for name, ref in expect.items():
        torch.testing.assert_close(get_criterion(name)(view, st, layer), ref, msg=name)
    s = get_criterion("set_signed")(view, st, layer).reshape(-1)
    flat = w.reshape(-1)
    assert bool((s[flat == 0] == -1).all())
    pos, neg = flat > 0, flat < 0
    assert int(s[pos].argmin()) == int(flat[pos].argmin())  # smallest positive ranks lowest
    assert int(s[neg].argmin()) == int(flat[neg].argmax())  # negative closest to zero ranks lowest
    assert {"gradstep", "set_signed", "gradient", "momentum"} <= set(list_criteria())


def test_running_average_of_statistics():
    model = build()
    batches = make_batches()
    sched = ModeScheduler(model, None, total_steps=100, update_interval=50, stats_interval=1,
                          repartition="snip", growth="gradient", running_average=0.5,
                          data=probe_data(batches), loss_fn=F.cross_entropy)
    plain = ModeScheduler(model, None, total_steps=100, update_interval=50, repartition="snip",
                          growth="gradient", data=probe_data(batches), loss_fn=F.cross_entropy)
    first, second = plain._probe(1), plain._probe(2)
    assert not plain.running
    sched.step()
    sched.step()
    assert sched.running
    for k, v in sched.running.items():
        key = tuple(k.split("|")[1:])
        torch.testing.assert_close(v, 0.5 * first[key] + 0.5 * second[key])


# ---------------------------------------------------------------------------- bad input


def test_bad_arguments_name_the_problem():
    model = build()
    data, loss = probe_data(make_batches()), F.cross_entropy
    with pytest.raises(ValueError, match="unknown criterion 'nope'.*gradient"):
        ModeScheduler(model, total_steps=10, repartition="nope", data=data, loss_fn=loss)
    with pytest.raises(ValueError, match="unknown criterion 'grow'"):
        ModeScheduler(model, total_steps=10, growth="grow", data=data, loss_fn=loss)
    for frac in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction must be"):
            ModeScheduler(model, total_steps=10, fraction=frac, data=data, loss_fn=loss)
    with pytest.raises(ValueError, match="update_interval"):
        ModeScheduler(model, total_steps=10, update_interval=0, data=data, loss_fn=loss)
    with pytest.raises(ValueError, match="end_step=20 is beyond training"):
        ModeScheduler(model, total_steps=10, end_step=20, data=data, loss_fn=loss)
    with pytest.raises(ValueError, match="total_steps"):
        ModeScheduler(model, data=data, loss_fn=loss)
    with pytest.raises(ValueError, match="need gradient statistics"):
        ModeScheduler(model, total_steps=10)
    with pytest.raises(ValueError, match="unknown scope"):
        ModeScheduler(model, total_steps=10, scope="world", data=data, loss_fn=loss)
    dense = Net()
    with pytest.raises(ValueError, match="needs pruned entries"):
        ModeScheduler(dense, total_steps=10, prune="magnitude", data=data, loss_fn=loss)


def test_scheduler_on_a_compact_model_is_refused():
    model = build()
    sched = ModeScheduler(model, total_steps=10, update_interval=2, data=probe_data(make_batches()),
                          loss_fn=F.cross_entropy)
    wrapper = nn.Sequential(model)
    sched2 = ModeScheduler(wrapper, total_steps=10, update_interval=2, data=probe_data(make_batches()),
                           loss_fn=F.cross_entropy)
    compact_(model)
    with pytest.raises(ValueError, match="compact"):
        ModeScheduler(model, total_steps=10, repartition="magnitude", growth="random")
    with pytest.raises(RuntimeError, match="compacted|replaced"):
        sched.step()
    with pytest.raises(RuntimeError, match="compacted|replaced"):
        sched2.step()


@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_bad_criterion_output_raises_before_anything_changes(bad):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(group, stats, layer):
        s = group.dynamic.detach().abs().mean(0)
        if bad == "nan":
            s = s.clone()
            s.view(-1)[0] = float("nan")
            return s
        return s.reshape(-1)[:-1]

    sched = ModeScheduler(model, None, total_steps=10, update_interval=1, prune=broken, regrow="random",
                          repartition="magnitude", growth="random")
    with pytest.raises(ValueError, match="NaN|returned") as info:
        sched.step()
    assert "layer 'conv'" in str(info.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------- distributed

WORLD = 2


def _run_updates(batches_for_rank, steps=3):
    model = build(dtype=torch.float64)
    sched = ModeScheduler(model, None, total_steps=10, update_interval=1, prune="snip", regrow="gradient",
                          repartition="taylor", growth="gradient", data=lambda step: batches_for_rank,
                          loss_fn=F.cross_entropy, probe_batches=len(batches_for_rank))
    for _ in range(steps):
        sched.step()
    return {k: (m.clone(), l_.clone()) for k, (m, l_) in masks(model).items()}


def _rank_result(rank):
    mine = make_batches(2 * WORLD, seed=9, dtype=torch.float64)[rank::WORLD]  # different data per rank
    return _run_updates(mine)


@pytest.mark.slow
def test_two_gloo_ranks_hold_identical_masks_equal_to_single_process_on_union(tmp_path):
    results = run_on_gloo_ranks(_rank_result, WORLD, tmp_path)
    all_batches = make_batches(2 * WORLD, seed=9, dtype=torch.float64)
    union = all_batches[0::WORLD] + all_batches[1::WORLD]
    reference = _run_updates(union)
    for key, (mask, live) in reference.items():
        assert torch.equal(results[0][key][0], results[1][key][0]), key
        assert torch.equal(results[0][key][1], results[1][key][1]), key
        assert torch.equal(results[0][key][0], mask), key
        assert torch.equal(results[0][key][1], live), key


# ---------------------------------------------------------------------------- trainer / CLI

from padnet.data import DEFAULT_FASHION_MNIST_ROOT  # noqa: E402

needs_fmnist = pytest.mark.skipif(
    not any((DEFAULT_FASHION_MNIST_ROOT / f).exists() for f in ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte")),
    reason="Fashion-MNIST not installed",
)

DST_ARGS = ["train", "--variant", "pad", "--ratio", "0.3", "--density", "0.6", "--density-distribution", "erk",
            "--repartition", "magnitude", "--growth", "gradient", "--update-interval", "3", "--criterion", "magnitude",
            "--partition-iterations", "1", "--width", "0.125", "--max-train-samples", "256", "--max-test-samples", "64",
            "--batch-size", "32", "--epochs", "2", "--temperature-epochs", "1", "--seed", "2", "--threads", "1",
            "--quiet"]


def _strip_seconds(obj):
    if isinstance(obj, dict):
        return {k: _strip_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_strip_seconds(v) for v in obj]
    return obj


@pytest.mark.slow
@needs_fmnist
def test_trainer_runs_dst_logs_updates_and_resumes_bit_exactly(tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file

    from padnet.cli import main

    full = tmp_path / "full"
    assert main([*DST_ARGS, "--output-dir", str(full)]) == 0
    summary = json.loads((full / "summary.json").read_text())
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    updates = [u for r in rows for u in r["mode_updates"]]
    assert [u["step"] for u in updates] == [3, 6, 9]  # 16 steps, end at 75 % = step 12
    for u in updates:
        for v in u["layers"].values():
            assert v["pruned"] == v["regrown"] > 0 or v["pruned"] == v["regrown"] == 0
            assert {"kappa", "density", "dynamic_overlap", "demoted", "promoted"} <= set(v)
    assert summary["mode_scheduler"]["updates"] == 3 and "mask_churn.png" in summary["files"]
    assert (full / "mask_churn.png").stat().st_size > 0
    assert summary["dynamic_ratio"] == pytest.approx(0.3, abs=2e-3)
    # resume from the epoch-1 checkpoint: same metrics and weights, bit for bit
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "config.json", resumed / "config.json")
    shutil.copy(full / "checkpoint.prev.pt", resumed / "checkpoint.pt")
    assert main(["train", "--resume", "--output-dir", str(resumed), "--quiet"]) == 0
    rows_b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert _strip_seconds(rows_b) == _strip_seconds(rows)
    wa, wb = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys() and any("live_mask" in k for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("extra, match", [
    (["--repartition", "nope"], "unknown --repartition criterion 'nope'; known: .*gradient"),
    (["--density", "0"], "--density must be in"),
    (["--density", "0.2"], "exceeds --density"),
    (["--prune", "magnitude"], "--prune needs --density below 1"),
    (["--repartition", "magnitude", "--update-interval", "0"], "update_interval must be"),
    (["--repartition", "magnitude", "--mode-fraction", "1"], "mode_fraction must be in"),
    (["--repartition", "magnitude", "--mode-end", "1.5"], "mode_end"),
    (["--variant", "dynamic", "--ratio", "1", "--repartition", "magnitude"], "only meaningful|need --variant pad"),
])
def test_cli_rejects_bad_mode_schedule_flags(extra, match, tmp_path):
    from padnet.commands.train import add_train_args, resolve_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    base = ["--variant", "pad", "--ratio", "0.3", "--output-dir", str(tmp_path / "x")]
    args = parser.parse_args(base + extra)
    with pytest.raises(ValueError, match=match):
        resolve_from_args(args)
    assert not (tmp_path / "x").exists()
