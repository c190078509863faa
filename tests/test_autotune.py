"""Autotuned backend choice: cache hit / miss, on-disk persistence and invalidation, fallback, export."""

import json

import pytest
import torch
import torch.nn.functional as F

from padnet import ops
from padnet.layers import CompactDynamicConv2d, DynamicConv2d
from padnet.ops import autotune, backend_selection
from padnet.ops import dynamic_conv as dynamic_conv_ops

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """Autotuning on, cache directory empty and private to the test, process caches cleared before and after."""
    monkeypatch.setenv("PADNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PADNET_AUTOTUNE", "1")
    monkeypatch.setenv("PADNET_FUSED", "0")  # the C++ candidate has its own tests (test_fused.py)
    autotune.set_autotune(None)
    autotune.clear_autotune_cache()
    yield tmp_path / "cache"
    autotune.set_autotune(None)
    autotune.clear_autotune_cache()


def reference(x, pi, dyn, padding):
    return torch.cat([F.conv2d(x[b : b + 1], torch.einsum("k,k...->...", pi[b], dyn), None, 1, padding)
                      for b in range(x.shape[0])])


def inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 6, 6, generator=g, dtype=torch.double)
    pi = torch.softmax(torch.randn(batch, 3, generator=g, dtype=torch.double), -1)
    dyn = torch.randn(3, 5, 4, 3, 3, generator=g, dtype=torch.double)
    return x, pi, dyn


def count_trials(monkeypatch):
    """Every backend run (tuning trials and the real call), in order."""
    calls = []
    real = backend_selection.run_backend

    def spy(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(backend_selection, "run_backend", spy)
    monkeypatch.setattr(dynamic_conv_ops, "run_backend", spy)
    return calls


def test_miss_tunes_every_backend_then_hits_memory_and_disk(tuning, monkeypatch):
    monkeypatch.setattr(autotune, "RIVAL_FACTOR", float("inf"))  # always store a runner-up (tiny inputs)
    x, pi, dyn = inputs()
    trials = count_trials(monkeypatch)
    with torch.no_grad():
        y = ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    torch.testing.assert_close(y, reference(x, pi, dyn, 1))
    assert set(trials) == set(ops.CONCRETE_BACKENDS)  # miss: every candidate timed on the real inputs
    (key, choice), = ops.autotune_cache().items()
    assert trials[-1] == choice  # then the call itself runs the winner
    assert choice in ops.CONCRETE_BACKENDS and key[-1] is False  # no-grad key
    trials.clear()
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    assert trials == [choice]  # memory hit: only the call itself
    # the choice is on disk, keyed by torch version and CPU model
    files = list(tuning.glob("autotune-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["fingerprint"] == {"format": autotune.FORMAT, "torch": torch.__version__, "cpu": autotune.cpu_model()}
    assert list(data["entries"].values()) == [choice]
    (runner_up,) = data["runners_up"].values()
    assert runner_up in ops.CONCRETE_BACKENDS and runner_up != choice
    # a new process (simulated: memory caches cleared) reads the choice instead of tuning again, after
    # timing it once against the stored runner-up and the rule's choice (forced here to confirm it)
    autotune._MEMORY.clear()
    autotune._DISK = None
    backend_selection.clear_choices()
    confirmations = []
    monkeypatch.setattr(autotune, "_confirmed", lambda *a: confirmations.append(a[:2]) or True)
    trials.clear()
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    rule = ops.select_backend("auto", 4, 5, 1, out_pixels=36)
    assert confirmations == [(choice, r) for r in dict.fromkeys((runner_up, rule)) if r != choice]
    n = len(confirmations)
    assert trials == [choice]
    assert ops.autotune_cache() == {key: choice}
    trials.clear()
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    assert trials == [choice] and len(confirmations) == n  # confirmed once per process


def test_every_signature_part_is_a_separate_key(tuning):
    x, pi, dyn = inputs()
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
        ops.dynamic_conv2d(x[:2], pi[:2], dyn, None, padding=1)  # batch
        ops.dynamic_conv2d(x.float(), pi.float(), dyn.float(), None, padding=1)  # dtype
        ops.dynamic_conv2d(x, pi, dyn, None, padding=0)  # geometry
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1)
        try:
            ops.dynamic_conv2d(x, pi, dyn, None, padding=1)  # thread count
        finally:
            torch.set_num_threads(threads)
    ops.dynamic_conv2d(x, pi.requires_grad_(), dyn, None, padding=1).sum().backward()  # grad mode
    assert len(ops.autotune_cache()) == 6


def test_cache_file_of_another_torch_or_cpu_is_not_used(tuning, monkeypatch):
    x, pi, dyn = inputs()
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    first = autotune.cache_path()
    assert first.is_file()
    for field, value in (("cpu_model", lambda: "Another CPU 9000"), ("torch", "0.0.1")):
        autotune.clear_autotune_cache()
        if field == "cpu_model":
            monkeypatch.setattr(autotune, "cpu_model", value)
        else:
            monkeypatch.setattr(torch, "__version__", value)
        assert autotune.cache_path() != first
        trials = count_trials(monkeypatch)
        with torch.no_grad():
            ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
        assert set(trials) == set(ops.CONCRETE_BACKENDS)  # invalidated: tuned again
        monkeypatch.undo()
        monkeypatch.setenv("PADNET_CACHE_DIR", str(tuning))
        monkeypatch.setenv("PADNET_AUTOTUNE", "1")
        monkeypatch.setenv("PADNET_FUSED", "0")
    # a file whose stored fingerprint disagrees with its name (copied by hand) is ignored too
    autotune.clear_autotune_cache()
    data = json.loads(first.read_text())
    data["fingerprint"]["torch"] = "0.0.1"
    first.write_text(json.dumps(data))
    assert autotune.lookup(next(iter(json.loads(first.read_text())["entries"])), ops.CONCRETE_BACKENDS) is None


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]), json.dumps({"fingerprint": 3}),
                                     "__import__('os').system('false')"])
def test_damaged_cache_file_is_ignored_and_replaced(tuning, content):
    tuning.mkdir(parents=True)
    autotune.cache_path().write_text(content)
    x, pi, dyn = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ops.dynamic_conv2d(x, pi, dyn, None, padding=1), reference(x, pi, dyn, 1))
    data = json.loads(autotune.cache_path().read_text())
    assert len(data["entries"]) == 1


def test_cached_choice_outside_the_valid_backends_is_ignored(tuning):
    x, pi, dyn = inputs()
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    path = autotune.cache_path()
    data = json.loads(path.read_text())
    data["entries"] = {k: "evil" for k in data["entries"]}
    path.write_text(json.dumps(data))
    autotune.clear_autotune_cache()
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    assert set(ops.autotune_cache().values()) <= set(ops.CONCRETE_BACKENDS)


def sleeper(seconds: dict[str, float], log: list[str]):
    """A trial runner whose candidates take known times."""
    import time

    def run(name: str) -> None:
        log.append(name)
        time.sleep(seconds[name])

    return run


def new_process():
    autotune._MEMORY.clear()
    autotune._DISK = None


def test_stored_choice_is_confirmed_against_its_runner_up(tuning):
    key, log = ("toy", 1), []
    autotune.record(key, "fast", "slow")
    new_process()
    run = sleeper({"fast": 0.01, "slow": 0.02, "other": 0.0}, log)
    assert autotune.choose(key, ["slow", "fast", "other"], lambda: run, torch.device("cpu"), budget_s=10.0) == "fast"
    # a warm-up each and three rounds (alternating order) of the two stored names only; nothing else is tuned
    assert log == ["fast", "slow"] + ["fast", "slow", "slow", "fast", "fast", "slow"]
    log.clear()
    assert autotune.choose(key, ["slow", "fast", "other"], lambda: run, torch.device("cpu")) == "fast"
    assert log == []  # memory hit
    # without a stored runner-up (a one-candidate tune, or a runner-up no longer valid) nothing is timed
    autotune.record(("toy", 2), "fast")
    new_process()
    assert autotune.choose(("toy", 2), ["fast", "slow"], lambda: run, torch.device("cpu")) == "fast"
    assert autotune.choose(key, ["fast", "other"], lambda: run, torch.device("cpu")) == "fast"
    assert log == []


def test_stale_stored_choice_is_tuned_again_and_rewritten(tuning):
    """A choice persisted under load (here: the stored winner is now 1.5x slower) is not kept."""
    key, log = ("toy", 1), []
    autotune.record(key, "slow", "fast")
    new_process()
    run = sleeper({"fast": 0.01, "slow": 0.015, "other": 0.03}, log)
    assert autotune.choose(key, ["slow", "fast", "other"], lambda: run, torch.device("cpu")) == "fast"
    assert set(log) == {"slow", "fast", "other"}  # the whole candidate set timed again
    data = json.loads(autotune.cache_path().read_text())
    assert data["entries"] == {autotune._key_text(key): "fast"}
    assert data["runners_up"] == {autotune._key_text(key): "slow"}
    new_process()
    log.clear()
    assert autotune.choose(key, ["slow", "fast", "other"], lambda: run, torch.device("cpu")) == "fast"
    assert set(log) == {"fast", "slow"}  # the rewritten entry is confirmed, not tuned again


def test_stored_choice_that_now_fails_is_tuned_again(tuning):
    key = ("toy", 1)
    autotune.record(key, "broken", "fine")
    new_process()

    def run(name):
        if name == "broken":
            raise RuntimeError("out of memory")

    assert autotune.choose(key, ["fine", "broken"], lambda: run, torch.device("cpu")) == "fine"


def test_close_candidates_get_extra_alternating_runs(tuning):
    log = []
    run = sleeper({"a": 0.02, "b": 0.02, "c": 0.2}, log)
    assert autotune.tune(("toy", 3), ["a", "b", "c"], run, torch.device("cpu"), budget_s=10.0) in ("a", "b")
    r = autotune.TRIAL_REPEATS
    # every warm-up first; then repeats of a and b, the faster warm-up first; c not repeated (10x slower)
    assert log[:3] == ["a", "b", "c"] and log[3:3 + 2 * r] in (["a"] * r + ["b"] * r, ["b"] * r + ["a"] * r)
    assert log[3 + 2 * r:] in (["a", "b"] * r, ["b", "a"] * r)
    log.clear()
    run = sleeper({"a": 0.01, "b": 0.025}, log)
    assert autotune.tune(("toy", 4), ["a", "b"], run, torch.device("cpu"), budget_s=10.0) == "a"
    assert log == ["a", "b"] + ["a"] * r + ["b"] * r  # a clear winner (b repeated: under 4x slower): no extra runs


def test_slow_first_candidate_does_not_use_up_the_budget(tuning):
    """A rule's choice that is slow per call (as "output" at 512@4 on an AMD Zen 3) must not leave the
    others untimed: every candidate gets its warm-up before any repeats."""
    import time

    log = []
    run = sleeper({"slow": 0.12, "fast": 0.02, "mid": 0.05}, log)
    start = time.perf_counter()
    assert autotune.tune(("toy", 12), ["slow", "fast", "mid"], run, torch.device("cpu"), budget_s=0.3) == "fast"
    elapsed = time.perf_counter() - start
    assert log[:2] == ["slow", "fast"] and "slow" not in log[2:]  # the slow one is never repeated
    assert elapsed < 0.3 + 2 * 0.12 + 0.1  # the budget plus at most two calls (and scheduling slack)


def test_runner_up_is_a_close_second_or_an_untimed_candidate(tuning):
    def stored_rival(key):
        return json.loads(autotune.cache_path().read_text()).get("runners_up", {}).get(autotune._key_text(key))

    log = []
    run = sleeper({"a": 0.005, "b": 0.015, "c": 0.0}, log)  # b: 3x slower than a, repeated, not a runner-up
    assert autotune.tune(("toy", 5), ["a", "b"], run, torch.device("cpu"), budget_s=10.0) == "a"
    assert stored_rival(("toy", 5)) is None
    # the budget ran out after the first candidate: the next one, never timed, is what a later process tries
    assert autotune.tune(("toy", 6), ["a", "b", "c"], run, torch.device("cpu"), budget_s=0.0) == "a"
    assert stored_rival(("toy", 6)) == "b"
    new_process()
    log.clear()
    run = sleeper({"a": 0.02, "b": 0.0, "c": 0.0}, log)  # b is in fact faster: tuned again
    assert autotune.choose(("toy", 6), ["a", "b", "c"], lambda: run, torch.device("cpu")) in ("b", "c")


def test_confirmation_is_cheap_against_a_far_slower_rival_and_alternates(tuning):
    log = []
    autotune.record(("toy", 7), "fast", "slow")
    new_process()
    run = sleeper({"fast": 0.0, "slow": 0.03}, log)
    assert autotune.choose(("toy", 7), ["fast", "slow"], lambda: run, torch.device("cpu")) == "fast"
    assert log == ["fast", "slow"]  # the rival's warm-up is SLOW_FACTOR slower: settled without repeats
    log.clear()
    autotune.record(("toy", 8), "x", "y")
    new_process()
    run = sleeper({"x": 0.01, "y": 0.01}, log)
    autotune.choose(("toy", 8), ["x", "y"], lambda: run, torch.device("cpu"), budget_s=10.0)
    assert log[:8] == ["x", "y", "x", "y", "y", "x", "x", "y"]  # warm-ups, then rounds in alternating order


def test_stored_choice_is_also_confirmed_against_the_rule(tuning):
    """A stored winner that was tuned under noise and whose runner-up is no faster is still caught when the
    rule's choice (the first candidate) beats it: here it was really third."""
    log = []
    autotune.record(("toy", 9), "b", "c")
    new_process()
    run = sleeper({"a": 0.01, "b": 0.025, "c": 0.03}, log)
    assert autotune.choose(("toy", 9), ["a", "b", "c"], lambda: run, torch.device("cpu"), budget_s=10.0) == "a"
    assert "a" in log[:12]  # timed as a rival, then tuned again
    assert json.loads(autotune.cache_path().read_text())["entries"][autotune._key_text(("toy", 9))] == "a"


def test_oversized_cache_file_is_not_read(tuning, monkeypatch):
    tuning.mkdir(parents=True)
    key = autotune._key_text(("toy", 1))
    autotune.cache_path().write_text(json.dumps({"fingerprint": autotune.fingerprint(), "entries": {key: "a"}}))
    monkeypatch.setattr(autotune, "MAX_FILE_BYTES", 10)
    assert autotune.lookup(("toy", 1), ["a"]) is None


def test_runner_up_entries_from_an_untrusted_file_are_validated(tuning):
    tuning.mkdir(parents=True)
    key = autotune._key_text(("toy", 1))
    autotune.cache_path().write_text(json.dumps({
        "fingerprint": autotune.fingerprint(), "entries": {key: "fast"},
        "runners_up": {key: ["not", "a", "name"], "orphan": "slow"}}))
    log = []
    run = sleeper({"fast": 0.0, "slow": 0.0}, log)
    assert autotune.choose(("toy", 1), ["fast", "slow"], lambda: run, torch.device("cpu")) == "fast"
    assert log == [] and autotune._RUNNERS_UP == {}


def test_fallback_rule_when_tuning_is_off(tuning, monkeypatch):
    x, pi, dyn = inputs()
    trials = count_trials(monkeypatch)
    for off in ("env", "call"):
        if off == "env":
            monkeypatch.setenv("PADNET_AUTOTUNE", "0")
        else:
            monkeypatch.setenv("PADNET_AUTOTUNE", "1")
            autotune.set_autotune(False)
        with torch.no_grad():
            ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
        rule = ops.select_backend("auto", 4, 5, 1, out_pixels=36)
        assert trials == [rule]  # no timing: exactly one run, the rule's backend
        trials.clear()
    assert ops.autotune_cache() == {} and not list(tuning.glob("*.json"))
    autotune.set_autotune(None)
    with pytest.raises(ValueError, match="PADNET_AUTOTUNE"):
        monkeypatch.setenv("PADNET_AUTOTUNE", "maybe")
        autotune.autotune_enabled()
    with pytest.raises(TypeError):
        autotune.set_autotune("yes")


def test_explicit_backend_and_batch_one_never_tune(tuning, monkeypatch):
    x, pi, dyn = inputs()
    trials = count_trials(monkeypatch)
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1, backend="output")
        ops.dynamic_conv2d(x[:1], pi[:1], dyn, None, padding=1)
    assert trials == ["output"]  # batch 1 runs as one plain conv on its aggregated kernel
    assert ops.autotune_cache() == {}


def test_export_is_deterministic_and_does_not_tune(tuning, monkeypatch):
    x, pi, dyn = inputs()
    trials = count_trials(monkeypatch)
    with ops.export_mode(), torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    assert trials == [ops.select_backend("auto", 4, 5, 1, out_pixels=36, exporting=True)]
    assert ops.autotune_cache() == {}


def test_tuning_cost_is_bounded(tuning, monkeypatch):
    """No new trial starts once the budget is spent (the first candidate always runs)."""
    x, pi, dyn = inputs()
    trials = count_trials(monkeypatch)
    monkeypatch.setattr(autotune, "TUNE_BUDGET_S", 0.0)
    with torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    rule = ops.select_backend("auto", 4, 5, 1, out_pixels=36)
    # budget 0: the rule's backend gets its warm-up, nothing else is tried; then the call itself
    assert trials == [rule, rule]
    assert ops.autotune_cache() and set(ops.autotune_cache().values()) == {rule}


def test_unwritable_cache_dir_warns_once_and_keeps_choices_in_memory(tuning, monkeypatch):
    blocker = tuning.parent / "blocker"
    blocker.write_text("a file, not a directory")
    monkeypatch.setenv("PADNET_CACHE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(autotune, "_DISK_WARNED", False)
    x, pi, dyn = inputs()
    with pytest.warns(RuntimeWarning, match="cannot write"), torch.no_grad():
        ops.dynamic_conv2d(x, pi, dyn, None, padding=1)
    assert len(ops.autotune_cache()) == 1


@pytest.mark.parametrize("kind", ["ones", "element", "channel"])
def test_layers_under_autotuning_match_the_rule(tuning, kind):
    torch.manual_seed(0)
    layer = DynamicConv2d(6, 8, 3, padding=1, bias=True).double()
    if kind != "ones":
        g = torch.Generator().manual_seed(0)
        shape = layer.mode_mask.shape
        mask = ((torch.rand(shape, generator=g) < 0.3) if kind == "element"
                else (torch.arange(8) % 3 == 0).view(-1, 1, 1, 1).expand(shape)).double()
        layer.set_mode_mask("weight", mask)
    x = torch.randn(5, 6, 7, 7, dtype=torch.double)
    autotune.set_autotune(False)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(layer.parameters()))
    autotune.set_autotune(True)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(CompactDynamicConv2d(layer.eval())(x), ref, rtol=1e-10, atol=1e-12)
    assert ops.autotune_cache()


def test_channel_plan_split_or_dense_is_tuned_too(tuning):
    """Channel-structured masks: the split plan and the whole-layer dense plan are timed once per signature."""
    torch.manual_seed(0)
    layer = DynamicConv2d(6, 9, 3, padding=1, bias=True).double().eval()
    rows = (torch.arange(9) % 3 == 0).double().view(-1, 1, 1, 1).expand(layer.mode_mask.shape).clone()
    layer.set_mode_mask("weight", rows)
    compact = CompactDynamicConv2d(layer)
    x = torch.randn(4, 6, 8, 8, dtype=torch.double)
    autotune.set_autotune(False)
    with torch.no_grad():
        ref = compact(x)
    autotune.set_autotune(True)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), ref, rtol=1e-10, atol=1e-12)
        plans = {k: v for k, v in ops.autotune_cache().items() if k[0] == "channel_split"}
        assert len(plans) == 1 and set(plans.values()) <= {"dense", "split"}
        torch.testing.assert_close(compact(x), ref, rtol=1e-10, atol=1e-12)  # cached decision, same numbers
    assert len({k for k in ops.autotune_cache() if k[0] == "channel_split"}) == 1


def test_channel_split_decides_the_dense_backend_before_timing_the_plans(tuning, monkeypatch):
    """The dense plan runs the whole layer with its own tuned backend; that tuning happens before the plan
    timings (nested inside them, it inflated the dense plan's warm-up and made the split plan win wrongly)."""
    from padnet.ops.channel_split import channel_split_conv2d

    tuned = []
    real = autotune.tune
    monkeypatch.setattr(autotune, "tune", lambda key, cands, *a, **k: tuned.append(key) or real(key, cands, *a, **k))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 5, generator=g, dtype=torch.double)
    pi = torch.softmax(torch.randn(4, 3, generator=g, dtype=torch.double), -1)
    dyn_rows = torch.randn(3, 2, 6, 3, 3, generator=g, dtype=torch.double)
    sta_rows = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.double)
    order = torch.tensor([0, 5, 1, 2, 6, 3, 4])
    with torch.no_grad():
        y = channel_split_conv2d(x, pi, dyn_rows, sta_rows, order, None, 1, 1)
    plan = [i for i, key in enumerate(tuned) if key[0] == "channel_split"]
    dense = [i for i, key in enumerate(tuned) if key[0] != "channel_split" and key[1][1] == 7]  # [K, O=7, ...]
    assert plan and dense and dense[0] < plan[0]
    assert len(tuned) == 3  # the dynamic rows, the dense layer, the plan: no tuning inside the plan's timings
    w = torch.cat([sta_rows.expand(4, -1, -1, -1, -1),
                   torch.einsum("bk,k...->b...", pi, dyn_rows)], 1)[:, order]
    ref = torch.cat([F.conv2d(x[b:b + 1], w[b], padding=1) for b in range(4)])
    torch.testing.assert_close(y, ref)
