"""funclora.core.bound: a model and a config resolved once (specs, tied names, forward paths, init,
checks, counts)."""

import re

import pytest
import torch
from torch import nn

import funclora as fl
from conftest import TiedLM, assert_unchanged, snapshot
from funclora.core.bound import Bound, factor_dtype
from funclora.core.quantized import OutputRule
from funclora.core.rules import Factor, LinearRule, MultiheadAttentionRule
from funclora.errors import AdapterMismatchError


class OwnForward(nn.Linear):
    """An nn.Linear with a forward of its own: no linear view (its forward may read the weight its way)."""

    def forward(self, x):
        return super().forward(x) * 2


class Quantized(nn.Linear):
    """Stands in for a quantized linear: served by the output rule through the config."""


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 6)
        self.own = OwnForward(6, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.attn = nn.MultiheadAttention(6, 2)
        self.quant = Quantized(6, 6)
        self.lstm = nn.LSTM(6, 3)
        self.head = nn.Linear(3, 5)

    def forward(self, ids):
        h = self.own(self.fc(self.emb(ids)))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.lstm(self.quant(h))[0])


def _everything() -> tuple[Model, fl.LoraConfig]:
    config = fl.LoraConfig(target_modules=["emb", "fc", "own", "conv", "attn", "quant"],
                           target_parameters=["lstm.weight_hh_l0"], modules_to_save=["head"], bias="lora_only", r=2)
    config.register_custom_module({Quantized: OutputRule()})
    return Model(), config


# --- specs, shapes, sorting -------------------------------------------------------------------
def test_specs_shapes_and_updated_parameters():
    model, config = _everything()
    before = snapshot(model)
    bound = Bound(model, config)
    assert_unchanged(before, model)
    assert bound.shapes() == {
        "emb": {"lora_embedding_A": (2, 10), "lora_embedding_B": (4, 2)},
        "fc": {"lora_A": (2, 4), "lora_B": (6, 2), "bias": (6,)},
        "own": {"lora_A": (2, 6), "lora_B": (6, 2), "bias": (6,)},
        "conv": {"lora_A": (2, 6, 3), "lora_B": (6, 2, 1), "bias": (6,)},
        "attn": {"lora_A": (2, 6), "lora_B": (18, 2), "out_proj.lora_A": (2, 6), "out_proj.lora_B": (6, 2)},
        "quant": {"lora_A": (2, 6), "lora_B": (6, 2), "bias": (6,)},
        "lstm.weight_hh_l0": {"lora_A": (2, 3), "lora_B": (12, 2)},
        "head": {"weight": (5, 3), "bias": (5,)},
    }
    assert bound.specs["fc"]["lora_A"] == Factor((2, 4), "A") and bound.specs["fc"]["bias"] == (6,)
    assert bound.specs["head"] == {"weight": (5, 3), "bias": (5,)}
    assert bound.updated == {"emb": ("weight",), "fc": ("weight",), "own": ("weight",), "conv": ("weight",),
                             "attn": ("in_proj_weight", "out_proj.weight"), "quant": (),
                             "lstm.weight_hh_l0": ("weight_hh_l0",)}
    # MHA has no plain `bias` parameter: lora_only trains the biases of targets that have one
    assert list(bound.plan.biases) == ["fc", "own", "conv", "quant"]
    assert bound.replaced_names == (("head.weight", "head", "weight"), ("head.bias", "head", "bias"),
                                    ("fc.bias", "fc", "bias"), ("own.bias", "own", "bias"),
                                    ("conv.bias", "conv", "bias"), ("quant.bias", "quant", "bias"))
    assert bound.rnn_paths == ["lstm"]


def test_targets_are_sorted_into_the_forward_paths():
    model, config = _everything()
    bound = Bound(model, config)
    assert list(bound.lazy) == ["emb", "fc", "own", "conv"]
    fc = bound.lazy["fc"]
    assert (fc.name, fc.leaf, fc.a, fc.b, fc.scaling, fc.layout, fc.groups) == (
        "fc.weight", "weight", "lora_A", "lora_B", 4.0, "linear", 1)
    assert fc.store is model.fc._parameters and fc.module is model.fc
    assert (bound.lazy["emb"].a, bound.lazy["emb"].layout) == ("lora_embedding_A", "embedding")
    assert bound.lazy["conv"].layout == "conv"
    # only a Linear that keeps nn.Linear.forward gets the linear view
    assert list(bound.linear_views) == ["fc"]
    path, cls = bound.linear_views["fc"]
    assert path == "fc" and issubclass(cls, nn.Linear) and cls.forward is not nn.Linear.forward
    assert list(bound.output_views) == ["quant"]
    assert bound.output_views["quant"][0] == "quant" and issubclass(bound.output_views["quant"][1], Quantized)
    assert [p for p, _ in bound.generic] == ["attn", "lstm.weight_hh_l0"]
    assert bound.base_names["attn"] == (("in_proj_weight", "attn.in_proj_weight"),
                                        ("out_proj.weight", "attn.out_proj.weight"))


def test_a_linear_rule_subclass_with_its_own_delta_is_generic():
    class Doubled(LinearRule):
        def delta(self, module, factors, scaling):
            return {"weight": 2 * scaling * factors["lora_B"] @ factors["lora_A"]}

    config = fl.LoraConfig(target_modules=["0", "1"], r=2)
    config.register_custom_module({OwnForward: Doubled()})
    bound = Bound(nn.Sequential(nn.Linear(3, 3), OwnForward(3, 3)), config)
    assert list(bound.lazy) == ["0"] and [p for p, _ in bound.generic] == ["1"]


# --- tied and shared weights ------------------------------------------------------------------


def test_alias_and_owners_of_tied_weights():
    model = TiedLM()
    bound = Bound(model, fl.LoraConfig(target_modules=["lm_head", "body"], r=2))
    assert bound.alias == {"embed.weight": "embed.weight", "body.weight": "body.weight", "body.bias": "body.bias",
                           "lm_head.weight": "embed.weight"}
    assert bound.owners["lm_head.weight"] == (model.lm_head, "weight")
    assert bound.owners["embed.weight"] == (model.embed, "weight")
    assert bound.slots["lm_head.weight"] == (model.lm_head._parameters, "weight")
    assert bound.slot_twins == frozenset()          # two modules sharing one Parameter are two slots
    assert bound.tied_groups(["lm_head.weight"]) == {"embed.weight": ["embed.weight", "lm_head.weight"]}
    assert bound.tied_groups(["body.weight"]) == {}
    w = torch.ones(7, 4)
    assert bound.base("lm_head.weight", {"embed.weight": w}) is w            # a tied twin read by its canonical name
    assert bound.base("lm_head.weight", None) is model.embed.weight
    untied = bound.untie({"embed.weight": w, "body.weight": model.body.weight})
    assert untied["lm_head.weight"] is w and list(untied) == ["embed.weight", "body.weight", "lm_head.weight"]
    with pytest.raises(AdapterMismatchError) as info:
        bound.base("body.weight", {"embed.weight": w})
    assert str(info.value) == ("LoRA: the params dict has no entry 'body.weight' needed by a target; pass the "
                               "model's full named_parameters().")


def test_a_module_shared_under_two_paths_has_slot_twins():
    model = nn.Module()
    model.first = nn.Linear(3, 3)
    model.again = model.first                        # one module, two paths
    model.other = nn.Linear(3, 3)
    bound = Bound(model, fl.LoraConfig(target_modules=["first"], r=2))
    assert list(bound.plan.targets) == ["first"]     # named_modules gives the shared module once
    assert bound.slot_twins == frozenset({"again.weight", "again.bias"})
    assert bound.alias["again.weight"] == "first.weight"
    assert bound.slots["again.weight"][0] is bound.slots["first.weight"][0]
    assert bound.tied_groups(["first.weight"]) == {}     # twins of one module are no separate weights


# --- init and dtypes --------------------------------------------------------------------------
def test_init_gives_peft_init_and_clones_of_replaced_parameters():
    model, config = _everything()
    bound = Bound(model, config)
    adapter = bound.init(torch.Generator().manual_seed(0), None)
    assert list(adapter) == list(bound.specs)
    assert {p: {k: tuple(t.shape) for k, t in leaves.items()} for p, leaves in adapter.items()} == bound.shapes()
    assert not adapter["fc"]["lora_B"].any() and adapter["fc"]["lora_A"].abs().max() <= 0.5   # kaiming, 1/sqrt(4)
    assert not adapter["emb"]["lora_embedding_A"].any() and adapter["emb"]["lora_embedding_B"].abs().sum() > 0
    assert torch.equal(adapter["head"]["weight"], model.head.weight)
    assert adapter["head"]["weight"] is not model.head.weight and not adapter["head"]["weight"].requires_grad
    assert torch.equal(adapter["fc"]["bias"], model.fc.bias)
    again = bound.init(torch.Generator().manual_seed(0), None)
    assert all(torch.equal(adapter[p][k], again[p][k]) for p in adapter for k in adapter[p])
    assert bound.fits(adapter)


def test_factor_dtypes_follow_the_base_as_peft():
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4).double(), nn.Linear(4, 4))
    bound = Bound(model, fl.LoraConfig(target_modules=["0", "1", "2"], modules_to_save=None, bias="all", r=2))
    assert bound.leaf_dtypes() == {
        "0": {"lora_A": torch.float32, "lora_B": torch.float32, "bias": torch.bfloat16},   # fp32 over a bf16 base
        "1": {"lora_A": torch.float64, "lora_B": torch.float64, "bias": torch.float64},
        "2": {"lora_A": torch.float32, "lora_B": torch.float32, "bias": torch.float32}}
    as_base = bound.init(None, "base")
    assert [as_base[p]["lora_A"].dtype for p in "012"] == [torch.bfloat16, torch.float64, torch.float32]
    half = bound.init(None, torch.float16)
    assert {half[p][k].dtype for p in "012" for k in ("lora_A", "lora_B")} == {torch.float16}
    assert half["0"]["bias"].dtype == torch.bfloat16                        # replaced tensors keep their dtype
    assert bound.base_dtype_device("0") == (torch.bfloat16, torch.device("cpu"))


def test_output_view_factors_are_float32():
    config = fl.LoraConfig(target_modules=["0"], r=2)
    config.register_custom_module({Quantized: OutputRule()})
    bound = Bound(nn.Sequential(Quantized(3, 3).to(torch.bfloat16)), config)
    assert bound.base_dtype_device("0") == (torch.float32, torch.device("cpu"))
    assert bound.leaf_dtypes() == {"0": {"lora_A": torch.float32, "lora_B": torch.float32}}


def test_factor_dtype():
    assert factor_dtype(torch.float16, None) is torch.float32
    assert factor_dtype(torch.bfloat16, None) is torch.float32
    assert factor_dtype(torch.float64, None) is torch.float64
    assert factor_dtype(torch.bfloat16, "base") is torch.bfloat16
    assert factor_dtype(torch.float32, torch.float16) is torch.float16
    with pytest.raises(TypeError) as info:
        factor_dtype(torch.float32, "float16")
    assert str(info.value) == "LoRA.init: `dtype` must be None, 'base' or a torch.dtype, got 'float16'."
    with pytest.raises(TypeError) as info:
        factor_dtype(torch.float32, torch.int8)
    assert str(info.value) == (
        "LoRA.init: LoRA factors must have a real floating-point dtype, got torch.int8 (the base weight's dtype is "
        "torch.float32); pass dtype=torch.float32 or another float dtype.")
    with pytest.raises(TypeError, match=re.escape("got torch.int64 (the base weight's dtype is torch.int64)")):
        factor_dtype(torch.int64, "base")


# --- fits and check ---------------------------------------------------------------------------
@pytest.fixture
def small():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    bound = Bound(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
    return bound, bound.init(torch.Generator().manual_seed(0), None)


def _with(adapter, path, leaf, value):
    out = {p: dict(leaves) for p, leaves in adapter.items()}
    if value is None:
        del out[path][leaf]
    else:
        out[path][leaf] = value
    return out


def _check_message(bound, adapter, batched=0) -> str:
    assert not bound.fits(adapter) or batched
    with pytest.raises(AdapterMismatchError) as info:
        bound.check(adapter, batched)
    return str(info.value)


def test_check_accepts_a_fitting_adapter(small):
    bound, adapter = small
    assert bound.fits(adapter)
    bound.check(adapter)
    bound.check(fl.stack([adapter, adapter]), batched=1)
    assert not bound.fits(fl.stack([adapter, adapter]))     # fits is the per-call (unbatched) check


def test_check_explains_wrong_paths(small):
    bound, adapter = small
    assert _check_message(bound, [adapter]) == "LoRA: the adapter must be a dict {path: {leaf: tensor}}, got list."
    wrong = {"1" if p == "0" else p: leaves for p, leaves in adapter.items()}
    assert _check_message(bound, wrong) == (
        "LoRA: the adapter's module paths do not fit this model: missing ['0'], unexpected ['1']. Was it made "
        "for another model or config?")


def test_check_explains_wrong_leaves(small):
    bound, adapter = small
    assert _check_message(bound, _with(adapter, "0", "lora_B", None)) == (
        "LoRA: adapter['0'] has leaves ['lora_A'], expected ['lora_A', 'lora_B'].")
    assert _check_message(bound, {**adapter, "2": [adapter["2"]["weight"]]}) == (
        "LoRA: adapter['2'] has leaves list, expected ['bias', 'weight'].")
    assert _check_message(bound, _with(adapter, "0", "lora_A", [[0.0] * 4] * 2)) == (
        "LoRA: adapter['0']['lora_A'] is a list, expected a torch.Tensor. Build adapters with lora.init() (or "
        "fl.load_adapter) and keep every leaf a tensor.")


def test_check_explains_wrong_dtypes(small):
    bound, adapter = small
    assert _check_message(bound, _with(adapter, "0", "lora_A", torch.zeros(2, 4, dtype=torch.int32))) == (
        "LoRA: adapter['0']['lora_A'] has dtype torch.int32, expected a real floating-point dtype (float32, "
        "bfloat16, float16, float64): cast it, e.g. value.float().")
    assert _check_message(bound, _with(adapter, "0", "lora_B", torch.zeros(3, 2, dtype=torch.float64))) == (
        "LoRA: adapter['0']['lora_B'] has dtype torch.float64 but adapter['0']['lora_A'] has torch.float32: a "
        "layer's LoRA factors must share one dtype. Cast both, e.g. to torch.float32.")
    # saved-module parameters are no factors: another dtype is fine
    bf16 = _with(adapter, "2", "weight", adapter["2"]["weight"].to(torch.bfloat16))
    assert bound.fits(bf16)
    bound.check(bf16)


def test_check_explains_wrong_shapes(small):
    bound, adapter = small
    assert _check_message(bound, _with(adapter, "0", "lora_A", torch.zeros(3, 4))) == (
        "LoRA: adapter['0']['lora_A'] has shape (3, 4) but the model's 0 needs (2, 4). Was the adapter trained on "
        "another model or with another r?")
    assert _check_message(bound, fl.stack([adapter, adapter])) == (
        "LoRA: adapter['0']['lora_A'] has shape (2, 2, 4) but the model's 0 needs (2, 4). It has extra leading "
        "axes: vmap over a stacked adapter (torch.func.vmap(lora, in_dims=(0, None))).")
    assert _check_message(bound, adapter, batched=1) == (
        "LoRA: adapter['0']['lora_A'] has shape (2, 4) but the model's 0 needs (2, 4). Was the adapter trained on "
        "another model or with another r?")


def test_check_refuses_meta_leaves_unless_the_model_is_on_meta(small):
    bound, adapter = small
    meta = _with(adapter, "0", "lora_A", torch.empty(2, 4, device="meta"))
    assert _check_message(bound, meta) == (
        "LoRA: adapter['0']['lora_A'] is on the meta device: it has a shape but no values, so the layer's update "
        "would be lost. Load or create the adapter on a real device (fl.load_adapter(folder, device='cpu'), or "
        "lora.init()).")
    with torch.device("meta"):
        on_meta = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    meta_bound = Bound(on_meta, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
    assert meta_bound.on_meta("0") and not bound.on_meta("0")
    meta_adapter = meta_bound.init(None, None)
    assert meta_adapter["0"]["lora_A"].is_meta
    assert not meta_bound.fits(meta_adapter)                    # fits is the fast path only ...
    meta_bound.check(meta_adapter)                              # ... check lets a meta model take it


# --- counts and misc --------------------------------------------------------------------------
def test_num_parameters_counts_as_peft(small):
    bound, adapter = small
    # trainable: lora (2·4 + 3·2) + saved copy of '2' (3·2 + 2); all: base (4·3+3 + 3·2+2) + both again
    assert bound.num_parameters() == (14 + 8, 23 + 14 + 8)
    assert bound.num_parameters(adapter) == (22, 45)
    assert bound.num_parameters(fl.stack([adapter] * 3)) == (66, 89)


def test_num_parameters_counts_trained_biases_once():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    bound = Bound(model, fl.LoraConfig(target_modules=["0"], bias="all", r=2))
    # trained biases are the model's own parameters in PEFT: trainable, but no extra copy
    assert bound.num_parameters() == (14 + 3 + 2, 23 + 14)


def test_buffer_clones_and_replaced(small):
    bound, adapter = small
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3))
    bn = Bound(model, fl.LoraConfig(target_modules=["1"], r=1))
    clones = bn.buffer_clones()
    assert list(clones) == ["0.running_mean", "0.running_var", "0.num_batches_tracked"]
    assert all(torch.equal(clones[n], b) and clones[n] is not b for n, b in model.named_buffers())
    assert bound.replaced(adapter) == {"2.weight": adapter["2"]["weight"], "2.bias": adapter["2"]["bias"]}


def test_mha_target_keeps_its_rule():
    bound = Bound(nn.Sequential(nn.MultiheadAttention(4, 1)), fl.LoraConfig(target_modules=["0"], r=2))
    assert type(bound.plan.targets["0"].rule) is MultiheadAttentionRule
    assert bound.lazy == {} and bound.linear_views == {} and [p for p, _ in bound.generic] == ["0"]
