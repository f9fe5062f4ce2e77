"""funclora.core.rules: each built-in rule's factors, its update ΔW against the explicit s·B@A,
its forward overlay, its checks, and PEFT's init of each factor role."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from funclora.core.lazy import LoraWeight
from funclora.core.rules import (Conv1DRule, ConvRule, EmbeddingRule, Factor, LinearRule, MultiheadAttentionRule,
                                 ParameterRule, Rule, init_factor, overlay_is_builtin)
from funclora.errors import UnsupportedModuleError

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

S = 0.75  # a scaling that is neither 1 nor a power of two


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _factors(rule, module, r, seed=0):
    """Random factors of the shapes ``rule`` asks for (float64: comparisons are then exact enough)."""
    return {leaf: _randn(*spec.shape, seed=seed + i) for i, (leaf, spec) in enumerate(rule.factors(module, r).items())}


def _shapes(factors: dict) -> dict:
    return {leaf: (spec.shape, spec.role) for leaf, spec in factors.items()}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# --- factors ----------------------------------------------------------------------------------
def test_factor_shapes_of_every_builtin_rule():
    assert _shapes(LinearRule().factors(nn.Linear(5, 3), 2)) == {
        "lora_A": ((2, 5), "A"), "lora_B": ((3, 2), "B")}
    assert _shapes(Conv1DRule().factors(Conv1D(3, 5), 2)) == {   # nf=3 outputs, nx=5 inputs, weight (5, 3)
        "lora_A": ((2, 5), "A"), "lora_B": ((3, 2), "B")}
    assert _shapes(EmbeddingRule().factors(nn.Embedding(10, 4), 2)) == {
        "lora_embedding_A": ((2, 10), "embedding_A"), "lora_embedding_B": ((4, 2), "embedding_B")}
    assert _shapes(ConvRule().factors(nn.Conv1d(3, 6, 5), 2)) == {
        "lora_A": ((2, 3, 5), "A"), "lora_B": ((6, 2, 1), "B")}
    assert _shapes(ConvRule().factors(nn.Conv2d(3, 6, (3, 2)), 4)) == {
        "lora_A": ((4, 3, 3, 2), "A"), "lora_B": ((6, 4, 1, 1), "B")}
    assert _shapes(ConvRule().factors(nn.Conv3d(2, 4, 3), 2)) == {
        "lora_A": ((2, 2, 3, 3, 3), "A"), "lora_B": ((4, 2, 1, 1, 1), "B")}
    assert _shapes(ConvRule().factors(nn.Conv2d(4, 6, 3, groups=2), 4)) == {   # B is (out, r/groups, 1, 1)
        "lora_A": ((4, 4, 3, 3), "A"), "lora_B": ((6, 2, 1, 1), "B")}
    assert _shapes(MultiheadAttentionRule().factors(nn.MultiheadAttention(8, 2), 2)) == {
        "lora_A": ((2, 8), "A"), "lora_B": ((24, 2), "B"),
        "out_proj.lora_A": ((2, 8), "A"), "out_proj.lora_B": ((8, 2), "B")}


def test_factors_are_frozen_dataclasses():
    f = Factor((2, 4), "A")
    assert f == Factor((2, 4), "A") and f != Factor((2, 4), "B")
    with pytest.raises(AttributeError):
        f.shape = (3, 4)


def test_updated_parameters_of_every_builtin_rule():
    assert LinearRule().updated_parameters(nn.Linear(2, 2)) == ("weight",)
    assert EmbeddingRule().updated_parameters(nn.Embedding(2, 2)) == ("weight",)
    assert MultiheadAttentionRule().updated_parameters(nn.MultiheadAttention(4, 1)) == (
        "in_proj_weight", "out_proj.weight")
    assert ParameterRule("weight_hh_l0").updated_parameters(nn.LSTM(2, 3)) == ("weight_hh_l0",)


def test_dropout_support_per_rule():
    assert (LinearRule.supports_dropout, Conv1DRule.supports_dropout, ConvRule.supports_dropout) == (True,) * 3
    assert (EmbeddingRule.supports_dropout, MultiheadAttentionRule.supports_dropout,
            ParameterRule.supports_dropout, Rule.supports_dropout) == (False,) * 4


# --- delta vs the explicit formula ------------------------------------------------------------
def test_linear_delta_is_s_B_A():
    module = nn.Linear(5, 3).double()
    f = _factors(LinearRule(), module, 2)
    (name, d), = LinearRule().delta(module, f, S).items()
    assert name == "weight" and d.shape == module.weight.shape
    _close(d, S * f["lora_B"] @ f["lora_A"])


def test_conv1d_delta_is_transposed():
    module = Conv1D(3, 5).double()                      # weight (in=5, out=3)
    f = _factors(Conv1DRule(), module, 2)
    d = Conv1DRule().delta(module, f, S)["weight"]
    assert d.shape == (5, 3)
    _close(d, S * (f["lora_B"] @ f["lora_A"]).T)
    # and its forward (torch.addmm over an (in, out) weight) sees W + ΔW
    x = _randn(4, 5, seed=9)
    w = Conv1DRule().overlay(module, {"weight": module.weight}, f, S)["weight"]
    assert type(w) is LoraWeight
    _close(torch.addmm(module.bias, x, w), x @ (module.weight + d) + module.bias)


def test_embedding_delta_is_transposed():
    module = nn.Embedding(10, 4).double()
    f = _factors(EmbeddingRule(), module, 3)
    d = EmbeddingRule().delta(module, f, S)["weight"]
    assert d.shape == (10, 4)
    _close(d, S * (f["lora_embedding_B"] @ f["lora_embedding_A"]).T)
    ids = torch.tensor([[0, 9, 3], [3, 3, 1]])
    w = EmbeddingRule().overlay(module, {"weight": module.weight}, f, S)["weight"]
    _close(F.embedding(ids, w), (module.weight + d)[ids])


@pytest.mark.parametrize("conv, kernel", [(nn.Conv1d, 3), (nn.Conv2d, (3, 2)), (nn.Conv3d, 2)])
def test_conv_delta_sums_over_the_rank(conv, kernel):
    module = conv(3, 4, kernel).double()
    f = _factors(ConvRule(), module, 2)
    d = ConvRule().delta(module, f, S)["weight"]
    assert d.shape == module.weight.shape
    A, B = f["lora_A"], f["lora_B"].flatten(1)            # A (r, in, *k), B (out, r)
    want = S * torch.einsum("or,ri...->oi...", B, A)
    _close(d, want)
    for o in range(4):                                   # one entry spelled out
        _close(d[o, 1].flatten()[0], S * sum(B[o, p] * A[p, 1].flatten()[0] for p in range(2)))


def test_conv_forward_uses_the_layers_stride_padding_dilation():
    module = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2).double()
    f = _factors(ConvRule(), module, 2)
    w = ConvRule().overlay(module, {"weight": module.weight}, f, S)["weight"]
    x = _randn(2, 3, 9, 9, seed=7)
    dense = module.weight + ConvRule().delta(module, f, S)["weight"]
    _close(module._conv_forward(x, w, module.bias), F.conv2d(x, dense, module.bias, 2, 1, 2))


def test_grouped_conv_has_no_dense_delta_but_an_exact_forward():
    module = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    rule = ConvRule()
    f = _factors(rule, module, 4)
    with pytest.raises(NotImplementedError, match=re.escape(
            "the Conv2d has groups=2: its LoRA update (lora_A a full conv over all input channels, lora_B "
            "grouped, PEFT's layout) mixes channels across groups, so it is not a grouped kernel and cannot "
            "be merged into the weight.")):
        rule.delta(module, f, S)
    x = _randn(2, 4, 5, 5, seed=3)
    w = rule.overlay(module, {"weight": module.weight}, f, S)["weight"]
    # PEFT's grouped LoRA conv: A over all input channels (no groups), B a grouped 1×1 conv
    h = F.conv2d(x, f["lora_A"], None, 1, 1)
    want = F.conv2d(x, module.weight, module.bias, 1, 1, 1, 2) + S * F.conv2d(h, f["lora_B"], groups=2)
    _close(module._conv_forward(x, w, module.bias), want)


def test_conv_check_wants_the_rank_divisible_by_groups():
    module = nn.Conv2d(4, 6, 3, groups=2)
    ConvRule().check(module, 4, "enc.conv")
    with pytest.raises(UnsupportedModuleError) as info:
        ConvRule().check(module, 3, "enc.conv")
    assert str(info.value) == (
        "LoRA: 'enc.conv' is a Conv2d with groups=2 and the rank is 3; the rank must be divisible by groups. "
        "Choose another r (rank_pattern) or do not target this layer.")


def test_multihead_attention_delta_adapts_in_and_out_projection():
    module = nn.MultiheadAttention(8, 2).double()
    f = _factors(MultiheadAttentionRule(), module, 2)
    d = MultiheadAttentionRule().delta(module, f, S)
    assert list(d) == ["in_proj_weight", "out_proj.weight"]
    assert d["in_proj_weight"].shape == (24, 8) and d["out_proj.weight"].shape == (8, 8)
    _close(d["in_proj_weight"], S * f["lora_B"] @ f["lora_A"])
    _close(d["out_proj.weight"], S * f["out_proj.lora_B"] @ f["out_proj.lora_A"])   # once, not twice
    params = {"in_proj_weight": module.in_proj_weight, "out_proj.weight": module.out_proj.weight}
    over = MultiheadAttentionRule().overlay(module, params, f, S)
    _close(over["in_proj_weight"], module.in_proj_weight + d["in_proj_weight"])
    _close(over["out_proj.weight"], module.out_proj.weight + d["out_proj.weight"])


def test_multihead_attention_check_refuses_other_kdim():
    MultiheadAttentionRule().check(nn.MultiheadAttention(8, 2), 2, "attn")
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            "LoRA: the nn.MultiheadAttention at 'attn' has kdim/vdim different from embed_dim; only same "
            "embed for query/key/value is supported. Target its parameters instead "
            "(target_parameters=['attn.q_proj_weight', ...]).")):
        MultiheadAttentionRule().check(nn.MultiheadAttention(8, 2, kdim=4, vdim=4), 2, "attn")


def test_file_keys_as_peft_names_them():
    assert LinearRule().file_key("lora_A") == "lora_A.weight"
    assert EmbeddingRule().file_key("lora_embedding_A") == "lora_embedding_A"   # PEFT stores embedding factors bare
    assert Rule().file_key("x.lora_B") == "x.lora_B.weight"
    assert Rule().file_key("scale") == "scale"
    assert MultiheadAttentionRule().file_key("lora_B") == "lora_B.weight"
    assert MultiheadAttentionRule().file_key("out_proj.lora_A") == "base_layer.out_proj.lora_A.weight"


# --- ParameterRule ----------------------------------------------------------------------------
class Holder(nn.Module):
    def __init__(self, *shape, transposed=None):
        super().__init__()
        self.w = nn.Parameter(_randn(*shape, seed=11))
        if transposed is not None:
            self.is_transposed = transposed


def test_parameter_rule_2d():
    module, rule = Holder(6, 4), ParameterRule("w")
    assert repr(rule) == "ParameterRule('w')"
    assert _shapes(rule.factors(module, 3)) == {"lora_A": ((3, 4), "A"), "lora_B": ((6, 3), "B")}
    f = _factors(rule, module, 3)
    _close(rule.delta(module, f, S)["w"], S * f["lora_B"] @ f["lora_A"])
    _close(rule.overlay(module, {"w": module.w}, f, S)["w"], module.w + S * f["lora_B"] @ f["lora_A"])


def _expert_reference(A, B, E, r, transposed):
    out = []
    for e in range(E):
        A_e = A[e * r:(e + 1) * r]                  # rows e·r … e·r+r-1
        B_e = B[:, e::E]                            # columns e, e+E, e+2E, …
        d = S * B_e @ A_e
        out.append(d.T if transposed else d)
    return torch.stack(out)


def test_parameter_rule_3d_experts():
    E, d1, d2, r = 3, 5, 4, 2
    module, rule = Holder(E, d1, d2), ParameterRule("w")
    assert _shapes(rule.factors(module, r)) == {"lora_A": ((r * E, d2), "A"), "lora_B": ((d1, r * E), "B")}
    f = _factors(rule, module, r)
    d = rule.delta(module, f, S)["w"]
    assert d.shape == (E, d1, d2)
    _close(d, _expert_reference(f["lora_A"], f["lora_B"], E, r, transposed=False))


def test_parameter_rule_3d_experts_transposed():
    E, d1, d2, r = 3, 5, 4, 2
    module, rule = Holder(E, d1, d2, transposed=True), ParameterRule("w")
    assert _shapes(rule.factors(module, r)) == {"lora_A": ((r * E, d1), "A"), "lora_B": ((d2, r * E), "B")}
    f = _factors(rule, module, r)
    d = rule.delta(module, f, S)["w"]
    assert d.shape == (E, d1, d2)
    _close(d, _expert_reference(f["lora_A"], f["lora_B"], E, r, transposed=True))
    # is_transposed=False is the plain layout
    assert _shapes(rule.factors(Holder(E, d1, d2, transposed=False), r))["lora_A"] == ((r * E, d2), "A")


def test_parameter_rule_4d_flattens_the_trailing_axes():
    module, rule = Holder(6, 2, 3, 3), ParameterRule("w")
    assert _shapes(rule.factors(module, 2)) == {"lora_A": ((2, 18), "A"), "lora_B": ((6, 2), "B")}
    f = _factors(rule, module, 2)
    d = rule.delta(module, f, S)["w"]
    assert d.shape == (6, 2, 3, 3)
    _close(d, (S * f["lora_B"] @ f["lora_A"]).reshape(6, 2, 3, 3))


def test_parameter_rule_check_refuses_1d():
    ParameterRule("w").check(Holder(2, 2), 2, "m.w")
    with pytest.raises(UnsupportedModuleError) as info:
        ParameterRule("w").check(Holder(5), 2, "m.w")
    assert str(info.value) == (
        "LoRA: target_parameters matched 'm.w', a 1-D parameter; LoRA needs a parameter with at least 2 "
        "dimensions. Remove it from target_parameters.")


# --- overlays ---------------------------------------------------------------------------------
def test_factored_overlay_is_a_lazy_weight_equal_to_the_dense_update():
    module = nn.Linear(5, 3).double()
    f = _factors(LinearRule(), module, 2)
    w = LinearRule().overlay(module, {"weight": module.weight}, f, S)["weight"]
    assert type(w) is LoraWeight and w.shape == (3, 5) and w.dtype == torch.float64
    x = _randn(4, 5, seed=5)
    _close(F.linear(x, w, module.bias), x @ (module.weight + S * f["lora_B"] @ f["lora_A"]).T + module.bias)
    _close(w + 0, module.weight + S * f["lora_B"] @ f["lora_A"])   # any other op sees the dense W + ΔW


def test_default_overlay_keeps_the_parameters_dtype():
    class Affine(Rule):
        def factors(self, module, r):
            return {"lora_A": Factor((r, 4), "A"), "lora_B": Factor((3, r), "B")}

        def delta(self, module, factors, scaling):
            return {"weight": scaling * factors["lora_B"] @ factors["lora_A"]}

    w = torch.ones(3, 4, dtype=torch.bfloat16)
    f = {"lora_A": torch.full((2, 4), 0.5), "lora_B": torch.full((3, 2), 0.25)}   # float32 factors
    out = Affine().overlay(None, {"weight": w}, f, 2.0)
    assert out["weight"].dtype == torch.bfloat16
    assert torch.equal(out["weight"], torch.full((3, 4), 1.5, dtype=torch.bfloat16))  # 1 + 2·(2·0.5·0.25)


def test_base_rule_says_what_is_missing():
    with pytest.raises(NotImplementedError, match=re.escape("Rule.factors(module, r) is not implemented")):
        Rule().factors(nn.Linear(2, 2), 2)

    class Half(Rule):
        pass

    with pytest.raises(NotImplementedError, match=re.escape("Half.delta(module, factors, scaling) is not implemented")):
        Half().delta(nn.Linear(2, 2), {}, 1.0)
    assert repr(Half()) == "Half()" and repr(LinearRule()) == "LinearRule()"
    assert Rule().updated_parameters(nn.Linear(2, 2)) == ("weight",)
    assert Rule().check(nn.Linear(2, 2), 2, "x") is None


def test_overlay_is_builtin():
    class Renamed(LinearRule):
        pass

    class Own(LinearRule):
        def overlay(self, module, params, factors, scaling, *, dropout=0.0, path=""):
            return {}

    class Minimal(Rule):                                 # inherits Rule's default overlay
        pass

    assert overlay_is_builtin(LinearRule()) and overlay_is_builtin(ConvRule())
    assert overlay_is_builtin(MultiheadAttentionRule()) and overlay_is_builtin(ParameterRule("w"))
    assert overlay_is_builtin(Renamed()) and overlay_is_builtin(Minimal())
    assert not overlay_is_builtin(Own())
    from funclora.core.quantized import OutputRule
    assert not overlay_is_builtin(OutputRule())


# --- init_factor ------------------------------------------------------------------------------
def _kaiming(shape, seed):
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    return t


def test_init_true_is_kaiming_A_and_zero_B():
    a = init_factor(Factor((4, 50), "A"), 4, True, torch.Generator().manual_seed(0))
    assert a.dtype == torch.float32 and a.shape == (4, 50)
    assert torch.equal(a, _kaiming((4, 50), 0))
    assert a.abs().max() <= 1 / math.sqrt(50) and a.abs().max() > 0.9 / math.sqrt(50)   # U(±1/sqrt(fan_in))
    assert torch.equal(init_factor(Factor((6, 4), "B"), 4, True), torch.zeros(6, 4))
    conv_a = init_factor(Factor((2, 3, 5, 5), "A"), 2, True, torch.Generator().manual_seed(1))
    assert conv_a.abs().max() <= 1 / math.sqrt(75)                                    # fan_in = in·k·k


def test_init_gaussian_is_normal_with_std_one_over_r():
    a = init_factor(Factor((8, 4000), "A"), 8, "gaussian", torch.Generator().manual_seed(0))
    want = torch.empty(8, 4000).normal_(0.0, 1 / 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, want)
    assert abs(a.std().item() - 0.125) < 0.003
    assert torch.equal(init_factor(Factor((4, 8), "B"), 8, "gaussian"), torch.zeros(4, 8))


def test_init_false_gives_both_factors_random_values():
    a = init_factor(Factor((4, 6), "A"), 4, False, torch.Generator().manual_seed(2))
    b = init_factor(Factor((5, 4), "B"), 4, False, torch.Generator().manual_seed(3))
    assert torch.equal(a, _kaiming((4, 6), 2)) and torch.equal(b, _kaiming((5, 4), 3))
    assert torch.count_nonzero(b) == 20                 # B@A != 0: a fresh adapter changes the model


def test_init_embedding_roles():
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    normal = torch.empty(3, 7).normal_(0.0, 1.0, generator=g())
    for how in (True, "gaussian"):                       # A zeros, B N(0, 1)
        assert torch.equal(init_factor(Factor((3, 7), "embedding_A"), 3, how, g()), torch.zeros(3, 7))
        assert torch.equal(init_factor(Factor((3, 7), "embedding_B"), 3, how, g()), normal)
    assert torch.equal(init_factor(Factor((3, 7), "embedding_A"), 3, False, g()), normal)  # False: both N(0, 1)
    assert torch.equal(init_factor(Factor((3, 7), "embedding_B"), 3, False, g()), normal)


def test_init_dtype_and_unknown_role():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    half = init_factor(Factor((2, 9), "A"), 2, True, g(), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, _kaiming((2, 9), 5).to(torch.bfloat16))   # drawn in float32, then cast
    with pytest.raises(ValueError) as info:
        init_factor(Factor((2, 2), "C"), 2, True)
    assert str(info.value) == "funclora: unknown factor role 'C'; use 'A', 'B', 'embedding_A' or 'embedding_B'."
