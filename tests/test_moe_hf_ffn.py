"""FFN conversion across transformer families (tiny random configs, built offline) and user mappings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.layers import CompactMoEFeedForward, MoEFeedForward
from padnet.models.hf_ffn import FFNMapping, find_ffn_sites, match_ffn, register_ffn_mapping, unregister_ffn_mapping

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=2, intermediate_size=24, vocab_size=60)

FAMILIES = {
    "bert": (lambda T: T.BertModel(T.BertConfig(**SMALL), add_pooling_layer=False), "text", "MoE"),
    "roberta": (lambda T: T.RobertaModel(T.RobertaConfig(**SMALL, pad_token_id=1), add_pooling_layer=False),
                "text", "MoE"),
    "electra": (lambda T: T.ElectraModel(T.ElectraConfig(embedding_size=16, **SMALL)), "text", "MoE"),
    "distilbert": (lambda T: T.DistilBertModel(T.DistilBertConfig(dim=16, n_heads=2, n_layers=2, hidden_dim=24,
                                                                   vocab_size=60)), "text", "Seq"),
    "vit": (lambda T: T.ViTModel(T.ViTConfig(image_size=8, patch_size=4, **SMALL), add_pooling_layer=False),
            "image", "MoE"),
    "deit": (lambda T: T.DeiTModel(T.DeiTConfig(image_size=8, patch_size=4, **SMALL), add_pooling_layer=False),
             "image", "MoE"),
    "gpt2": (lambda T: T.GPT2Model(T.GPT2Config(n_embd=16, n_head=2, n_layer=2, n_inner=24, vocab_size=60,
                                                 bos_token_id=0, eos_token_id=0)), "text", "Seq"),
    "gptj": (lambda T: T.GPTJModel(T.GPTJConfig(n_embd=16, n_head=2, n_layer=2, n_inner=24, rotary_dim=4,
                                                 vocab_size=60, bos_token_id=0, eos_token_id=0)), "text", "Seq"),
    "t5": (lambda T: T.T5EncoderModel(T.T5Config(d_model=16, d_ff=24, num_heads=2, num_layers=2, d_kv=8,
                                                  vocab_size=60)), "text", "MoE"),
    "t5_gated": (lambda T: T.T5EncoderModel(T.T5Config(d_model=16, d_ff=24, num_heads=2, num_layers=2, d_kv=8,
                                                        vocab_size=60, feed_forward_proj="gated-gelu")),
                 "text", "MoE"),
    "llama": (lambda T: T.LlamaModel(T.LlamaConfig(num_key_value_heads=2, **SMALL)), "text", "MoE"),
    "mistral": (lambda T: T.MistralModel(T.MistralConfig(num_key_value_heads=2, **SMALL)), "text", "MoE"),
    "qwen2": (lambda T: T.Qwen2Model(T.Qwen2Config(num_key_value_heads=2, **SMALL)), "text", "MoE"),
}
GATED = {"t5_gated", "llama", "mistral", "qwen2"}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with _quiet():
        model = FAMILIES[family][0](transformers)
    return model.eval()


class _quiet:
    def __enter__(self):
        self.level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()

    def __exit__(self, *exc):
        transformers.logging.set_verbosity(self.level)


def inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if FAMILIES[family][1] == "image":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g)}
    return {"input_ids": torch.randint(2, 60, (2, 7), generator=g)}


def hidden(model: nn.Module, inp: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inp).last_hidden_state


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (MoEFeedForward, CompactMoEFeedForward))]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_converts_by_structure_and_matches_the_dense_model_at_step_0(family):
    model = build(family)
    inp = inputs(family)
    ref = hidden(model, inp)
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(noise_std=0.0)))  # no targets: every FFN
    layers = moe_layers(model)
    assert len(layers) == 2  # one per transformer layer, nothing else
    assert all(m.gated == (family in GATED) for m in layers)
    got = hidden(model, inp)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, f"{family}: step-0 relative error {rel:.2e}"
    # and the converted FFNs train: gradients reach experts and router
    model.train()
    out = model(**inp).last_hidden_state
    (out.pow(2).mean() + padnet.layers.collect_aux_loss(model)).backward()
    assert layers[0].experts_out.grad is not None and layers[0].router.weight.grad is not None


def test_gpt2_conv1d_weights_are_transposed_into_the_experts():
    model = build("gpt2")
    mlp = model.h[0].mlp
    site = match_ffn("h.0.mlp", mlp)
    assert (site.in_proj, site.out_proj, site.gate_proj, site.output_dropout) == ("c_fc", "c_proj", None, "dropout")
    c_fc, c_proj = mlp.c_fc.weight.detach().clone(), mlp.c_proj.weight.detach().clone()
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(noise_std=0.0)))
    moe = model.h[0].mlp[0]
    assert isinstance(model.h[0].mlp[1], nn.Dropout)  # GPT-2's output dropout kept after the MoE
    torch.testing.assert_close(moe.experts_in[2], c_fc.t())  # Conv1D weight is [in, out]
    torch.testing.assert_close(moe.static_out, c_proj.t())


def test_gate_and_up_roles_come_from_the_probe_not_the_names():
    model = build("t5_gated")
    block = model.encoder.block[0].layer[1].DenseReluDense
    site = match_ffn("ffn", block)
    assert (site.gate_proj, site.in_proj, site.out_proj, site.hidden_dropout) == ("wi_0", "wi_1", "wo", "dropout")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_converted_family_save_load_and_compact(family, tmp_path):
    cfg = padnet.PadConfig(moe=padnet.MoEConfig(noise_std=0.01, routing="sigmoid", bias_balancing=True), seed=3)
    model = padnet.dynamize_(build(family), cfg)
    g = torch.Generator().manual_seed(0)
    for layer in moe_layers(model):
        for grp in layer.mode_groups():
            layer.set_mode_mask(grp.name, (torch.rand(grp.shape, generator=g) < 0.4).float())
        layer.expert_bias.copy_(torch.randn(layer.num_experts, generator=g) * 0.1)
    inp = inputs(family)
    ref = hidden(model, inp)
    path = padnet.save(model, tmp_path / f"{family}.safetensors")
    loaded = padnet.load(path, model=build(family, seed=9))  # a fresh dense model: dynamize is replayed
    torch.testing.assert_close(hidden(loaded.eval(), inp), ref, rtol=0, atol=0)
    padnet.compact_(model)
    assert all(isinstance(m, CompactMoEFeedForward) for m in moe_layers(model))
    torch.testing.assert_close(hidden(model, inp), ref, rtol=1e-5, atol=1e-6)
    path2 = padnet.save(model, tmp_path / f"{family}_compact.safetensors")
    loaded2 = padnet.load(path2, model=build(family, seed=9))
    torch.testing.assert_close(hidden(loaded2.eval(), inp), hidden(model, inp), rtol=0, atol=0)


class TimmStyleMlp(nn.Module):
    """Hand-written equivalent of timm's Mlp: fc1, act, drop1, norm (Identity), fc2, drop2."""

    def __init__(self, h=8, i=20, p=0.1):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(h, i), nn.GELU(), nn.Dropout(p)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(i, h), nn.Dropout(p)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def test_timm_style_mlp_keeps_output_dropout_and_drops_hidden_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), TimmStyleMlp()).eval()
    site = match_ffn("1", model[1])
    assert (site.output_dropout, site.hidden_dropout) == ("drop2", "drop1")
    x = torch.randn(3, 5, 8)
    ref = model(x)
    padnet.dynamize_(model, padnet.PadConfig(moe=padnet.MoEConfig(noise_std=0.0)))
    assert isinstance(model[1], nn.Sequential) and isinstance(model[1][1], nn.Dropout)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


class OddGatedMlp(nn.Module):
    """Mixtral-expert naming, activation as a function (no activation child): not found structurally."""

    def __init__(self, h=8, i=12):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False), nn.Linear(h, i, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([OddGatedMlp() for _ in range(2)])

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = x + b(x)
        return x


def test_user_mapping_converts_an_unusual_gated_ffn():
    torch.manual_seed(0)
    model = Net().eval()
    assert match_ffn("blocks.0", model.blocks[0]) is None
    mapping = FFNMapping(in_proj="w3", gate_proj="w1", out_proj="w2", activation="silu")
    x = torch.randn(2, 5, 4)
    ref = model(x)
    conv = register_ffn_mapping(mapping)
    try:
        padnet.dynamize_(model, padnet.PadConfig(target_modules=["blocks.0", "blocks.1"],
                                                 moe=padnet.MoEConfig(noise_std=0.0, num_experts=3, top_k=1)))
    finally:
        unregister_ffn_mapping(mapping)
    assert conv.name not in padnet.transforms.conversion.converter_names()
    assert all(isinstance(b, MoEFeedForward) and b.gated and not b.has_bias for b in model.blocks)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


def test_mapping_errors_name_the_module_and_the_problem():
    torch.manual_seed(0)
    model = Net()
    with pytest.raises(ValueError, match=r"'blocks\.0' \(OddGatedMlp\): no submodule \['w4'\].*children: \['w1', 'w2', 'w3'\]"):
        register_ffn_mapping(FFNMapping(in_proj="w4", gate_proj="w1", out_proj="w2", activation="silu"))
        try:
            padnet.dynamize_(model, padnet.PadConfig())
        finally:
            unregister_ffn_mapping(FFNMapping(in_proj="w4", gate_proj="w1", out_proj="w2", activation="silu"))
    # projections whose shapes disagree
    with pytest.raises(ValueError, match=r"'blocks\.0'.*shapes disagree: 'w3' is 8 -> 12, expected 12 -> 8"):
        find_ffn_sites(model, FFNMapping(in_proj="w1", out_proj="w3", activation="silu"))
    # names that exist but do not compute the block (gate and up swapped)
    with pytest.raises(ValueError, match=r"'blocks\.0'.*output is not out\(act\(gate\(x\)\) \* in\(x\)\)"):
        find_ffn_sites(model, FFNMapping(in_proj="w1", gate_proj="w3", out_proj="w2", activation="silu"))
    with pytest.raises(ValueError, match="matched no module"):
        find_ffn_sites(model, FFNMapping(in_proj="up", out_proj="down", activation="relu"))
    with pytest.raises(ValueError, match="names the same module twice"):
        FFNMapping(in_proj="w1", out_proj="w1")
    with pytest.raises(ValueError, match="neither a child module nor a known activation"):
        find_ffn_sites(model, FFNMapping(in_proj="w3", gate_proj="w1", out_proj="w2", activation="swooshy"))


def test_config_errors_for_moe_options():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\], got 6"):
        padnet.MoEConfig(top_k=6)
    with pytest.raises(ValueError, match=r"bias_update_rate \(gamma\) must be a finite number >= 0"):
        padnet.MoEConfig(bias_update_rate=-0.5)
    with pytest.raises(ValueError, match="unknown MoE routing"):
        padnet.MoEConfig(routing="expert_choice")


@pytest.mark.parametrize("model_type", ["distilbert", "gpt2", "llama"])
def test_text_classifier_on_other_families_converts_with_the_text_recipe_config(model_type):
    """The text recipe's PadConfig (target_types=["ffn"]) on a BertClassifier over another family's encoder."""
    from padnet.models.bert import bert_classifier

    configs = {
        "distilbert": {"model_type": "distilbert", "dim": 16, "n_heads": 2, "n_layers": 2, "hidden_dim": 24,
                       "vocab_size": 60},
        "gpt2": {"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 2, "n_inner": 24, "vocab_size": 60,
                 "bos_token_id": 0, "eos_token_id": 0, "hidden_size": 16},
        "llama": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2,
                  "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 60},
    }
    torch.manual_seed(0)
    with _quiet():
        model = bert_classifier(config=configs[model_type], num_labels=3, dropout=0.0).eval()
    ids = torch.randint(2, 60, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    padnet.dynamize_(model, padnet.PadConfig(target_types=["ffn"], moe=padnet.MoEConfig(noise_std=0.0), seed=0))
    assert len(moe_layers(model)) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask), ref, rtol=1e-5, atol=1e-6)


def test_zoo_classifier_on_another_family_saves_and_loads_from_its_spec_alone(tmp_path):
    """padnet.load(path) with no model: the spec is checked on the meta device (shapes only, no probe)."""
    from padnet.models.bert import bert_classifier

    cfg = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2,
           "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 60}
    torch.manual_seed(0)
    with _quiet():
        model = bert_classifier(config=cfg, num_labels=2, dropout=0.0).eval()
    padnet.dynamize_(model, padnet.PadConfig(target_types=["ffn"], moe=padnet.MoEConfig(routing="noisy"), seed=0))
    ids = torch.randint(2, 60, (2, 6))
    with torch.no_grad():
        ref = model(ids)
    path = padnet.save(model, tmp_path / "llama_cls.safetensors")
    with _quiet():
        loaded = padnet.load(path).eval()
    assert sum(isinstance(m, MoEFeedForward) and m.gated for m in loaded.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ref, rtol=0, atol=0)
