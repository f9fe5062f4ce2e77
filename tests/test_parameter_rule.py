"""The generic ParameterRule (``target_parameters``): RNN weights, MHA in_proj, 3-D experts, any ≥2-D
parameter; MultiheadAttention's module rule applies its out_proj update once."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import funclora as fl
from funclora.testing import Experts, check_rule, parameter_cases, random_adapter

LSTM_PROJ = "ignore:LSTM with projections is not supported with oneDNN:UserWarning"  # PyTorch CPU notice
TOL = dict(atol=1e-5, rtol=1e-5)


class Recurrent(nn.Module):
    """Every kind of recurrent weight: 2 layers, both directions, LSTM proj_size, GRU, RNN."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
        self.gru = nn.GRU(6, 5, num_layers=2)
        self.rnn = nn.RNN(5, 4, nonlinearity="relu", bidirectional=True)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.rnn(h)[0]


def _all_weights(model):
    return [n for n, p in model.named_parameters() if p.dim() >= 2]


@pytest.mark.filterwarnings(LSTM_PROJ)
def test_every_recurrent_weight_at_once_merge_equals_apply():
    torch.manual_seed(0)
    model = Recurrent()
    names = _all_weights(model)
    assert "lstm.weight_hr_l1_reverse" in names and "rnn.weight_hh_l0_reverse" in names and len(names) == 20
    lora = fl.LoRA(model, fl.LoraConfig(target_parameters=names, r=2, lora_alpha=4))
    assert lora.targeted_parameter_names == names and lora.targeted_module_names == []
    for name in names:
        out, inp = model.get_parameter(name).shape
        assert lora.shapes()[name] == {"lora_A": (2, inp), "lora_B": (out, 2)}
    adapter = random_adapter(lora)
    x = torch.randn(2, 5, 4)
    out = lora(adapter, x)
    assert (out - model(x)).abs().max() > 1e-3
    merged = lora.merge(adapter)
    torch.testing.assert_close(torch.func.functional_call(model, merged, (x,)), out, **TOL)
    for name in names:  # ΔW = s·B@A, nothing else
        a = adapter[name]
        torch.testing.assert_close(merged[name], model.get_parameter(name) + 2 * a["lora_B"] @ a["lora_A"])
    fresh = lora.init(generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lora(fresh, x), model(x))


@pytest.mark.parametrize("kind, name", [("LSTM", "weight_ih_l0"), ("LSTM", "weight_hh_l1_reverse"),
                                        ("GRU", "weight_hh_l0"), ("RNN", "weight_ih_l1")])
def test_recurrent_weight_same_outputs_as_peft(kind, name):
    import peft

    torch.manual_seed(0)
    model = nn.Sequential(getattr(nn, kind)(4, 6, num_layers=2, bidirectional=True))
    key = f"0.{name}"
    lora = fl.LoRA(model, fl.LoraConfig(target_parameters=[key], r=2, lora_alpha=4))
    adapter = random_adapter(lora)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_parameters=[key], r=2, lora_alpha=4))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for leaf in ("lora_A", "lora_B"):
            params[f"base_model.model.0.{leaf}.default.weight"].copy_(adapter[key][leaf])
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(lora(adapter, x)[0], peft_model(x)[0], **TOL)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def test_mha_in_proj_weight_by_parameter():
    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(2, 5, 8)
    lora = fl.LoRA(model, fl.LoraConfig(target_parameters=["mha.in_proj_weight"], r=2))
    assert lora.shapes() == {"mha.in_proj_weight": {"lora_A": (2, 8), "lora_B": (24, 2)}}
    adapter = random_adapter(lora)
    out = lora(adapter, x)
    torch.testing.assert_close(torch.func.functional_call(model, lora.merge(adapter), (x,)), out, **TOL)
    assert (out - model(x)).abs().max() > 1e-3


# --- MultiheadAttention: out_proj applied once ---------------------------------------------------
def test_mha_out_proj_update_applied_once_and_peft_applies_it_twice():
    """PEFT 0.21.2 adds the out_proj delta twice (forward and merge; open PR #3774); funclora once."""
    import peft

    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(2, 5, 8)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["mha"], r=2, lora_alpha=4))
    adapter = random_adapter(lora)
    out = lora(adapter, x)
    merged = lora.merge(adapter)
    torch.testing.assert_close(torch.func.functional_call(model, merged, (x,)), out, **TOL)
    a, s = adapter["mha"], 2.0
    out_delta = s * a["out_proj.lora_B"] @ a["out_proj.lora_A"]
    torch.testing.assert_close(merged["mha.out_proj.weight"], model.mha.out_proj.weight + out_delta)
    torch.testing.assert_close(merged["mha.in_proj_weight"],
                               model.mha.in_proj_weight + s * a["lora_B"] @ a["lora_A"])

    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["mha"], r=2, lora_alpha=4))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for leaf, value in a.items():
            prefix = "base_model.model.mha." + ("base_layer.out_proj." if leaf.startswith("out_proj.") else "")
            params[f"{prefix}{leaf.split('.')[-1]}.default.weight"].copy_(value)
    peft_out = peft_model(x)
    assert (peft_out - out).abs().max() > 1e-2
    doubled = {"mha": dict(a, **{"out_proj.lora_B": 2 * a["out_proj.lora_B"]})}
    torch.testing.assert_close(peft_out, lora(doubled, x), **TOL)  # differs exactly by the doubled delta
    peft_merged = dict(peft_model.merge_and_unload().named_parameters())
    torch.testing.assert_close(peft_merged["mha.in_proj_weight"], merged["mha.in_proj_weight"], **TOL)
    torch.testing.assert_close(peft_merged["mha.out_proj.weight"], merged["mha.out_proj.weight"] + out_delta, **TOL)


# --- 3-D expert weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("transposed", [False, True])
def test_expert_layout_is_peft_s(transposed):
    """A_e = rows e·r … e·r+r−1 of A; B_e = columns e, e+E, e+2E, … of B; ΔW[e] = s·B_e@A_e."""
    torch.manual_seed(0)
    E, d_in, d_out, r = 3, 4, 5, 2
    model = nn.Sequential(Experts(E, d_in, d_out, is_transposed=transposed))
    lora = fl.LoRA(model, fl.LoraConfig(target_parameters=["0.w"], r=r, lora_alpha=2 * r))
    assert lora.shapes()["0.w"] == {"lora_A": (r * E, d_in), "lora_B": (d_out, r * E)}
    adapter = random_adapter(lora)
    A, B = adapter["0.w"]["lora_A"], adapter["0.w"]["lora_B"]
    delta = lora.delta(adapter)["0.w"]
    for e in range(E):
        want = 2.0 * B[:, e::E] @ A[e * r:(e + 1) * r]       # (d_out, d_in)
        torch.testing.assert_close(delta[e], want.T if transposed else want)
    x = torch.randn(E, 3, d_in)
    torch.testing.assert_close(torch.func.functional_call(model, lora.merge(adapter), (x,)), lora(adapter, x), **TOL)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(E=st.integers(1, 4), d_in=st.integers(1, 6), d_out=st.integers(1, 6), r=st.integers(1, 3),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_experts_same_outputs_as_peft(E, d_in, d_out, r, transposed, seed):
    import peft

    assume(not (E == 1 and transposed))  # PEFT is wrong there: see the next test
    torch.manual_seed(seed)
    model = nn.Sequential(Experts(E, d_in, d_out, is_transposed=transposed))
    lora = fl.LoRA(model, fl.LoraConfig(target_parameters=["0.w"], r=r, lora_alpha=3))
    adapter = random_adapter(lora, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notice that target_parameters may recompile
        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_parameters=["0.w"], r=r,
                                                                                lora_alpha=3))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for leaf in ("lora_A", "lora_B"):
            target = params[f"base_model.model.0.{leaf}.default.weight"]
            assert tuple(target.shape) == tuple(adapter["0.w"][leaf].shape)
            target.copy_(adapter["0.w"][leaf])
    x = torch.randn(E, 3, d_in)
    torch.testing.assert_close(lora(adapter, x), peft_model(x), **TOL)


def test_single_transposed_expert_where_peft_is_wrong():
    """PEFT 0.21.2 forms a single expert's update as a plain ``B@A`` and ignores ``is_transposed``:
    the shapes clash unless d_in == d_out, and then its update is the transpose of the right one.
    funclora treats E == 1 like any E (its merge equals its forward)."""
    import peft

    torch.manual_seed(0)
    model = nn.Sequential(Experts(1, 3, 3, is_transposed=True))
    lora = fl.LoRA(model, fl.LoraConfig(target_parameters=["0.w"], r=2, lora_alpha=4))
    adapter = random_adapter(lora)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_parameters=["0.w"], r=2,
                                                                            lora_alpha=4))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for leaf in ("lora_A", "lora_B"):
            params[f"base_model.model.0.{leaf}.default.weight"].copy_(adapter["0.w"][leaf])
    x = torch.randn(1, 3, 3)
    a = adapter["0.w"]
    transposed_update = {"0.w": model[0].w + 2.0 * (a["lora_B"] @ a["lora_A"])[None]}
    torch.testing.assert_close(peft_model(x), torch.func.functional_call(model, transposed_update, (x,)), **TOL)
    torch.testing.assert_close(lora.delta(adapter)["0.w"][0], 2.0 * (a["lora_B"] @ a["lora_A"]).T)
    assert check_rule(lambda: Experts(1, 3, 4, is_transposed=True), fl.ParameterRule("w")).skipped == {}


# --- any parameter: laws over shapes, edge cases ---------------------------------------------------
@pytest.mark.filterwarnings(LSTM_PROJ)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=parameter_cases())
def test_parameter_rule_laws_over_shapes(case):
    """LSTM/GRU/RNN weights (layers, _reverse, proj_size), MHA in_proj_weight, experts; ranks."""
    report = check_rule(case.factory, case.rule, inputs=case.inputs, r=case.r)
    assert "merge equals apply" in report.checked


class Raw(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        return x @ self.w.reshape(self.w.shape[0], -1).T


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple), r=st.integers(1, 4))
def test_raw_parameters_of_any_rank(shape, r):
    """2-D as Linear; 3-D as experts; ≥4-D as (out, prod(rest)) (a funclora extension)."""
    x = torch.randn(3, shape[-1]) if len(shape) == 3 else torch.randn(3, int(torch.tensor(shape[1:]).prod()))
    if len(shape) == 3:
        factory, inputs = (lambda: Experts(shape[0], shape[2], shape[1])), (torch.randn(shape[0], 3, shape[2]),)
        report = check_rule(factory, fl.ParameterRule("w"), inputs=inputs, r=r)
    else:
        report = check_rule(lambda: Raw(shape), fl.ParameterRule("w"), inputs=(x,), r=r)
    assert report.skipped == {}


def test_one_dimensional_and_root_parameters_are_refused():
    model = nn.Sequential(nn.LSTM(3, 4))
    with pytest.raises(fl.UnsupportedModuleError, match=r"'0.bias_ih_l0', a 1-D parameter"):
        fl.LoRA(model, fl.LoraConfig(target_parameters=["0.bias_ih_l0"]))
    with pytest.raises(fl.UnsupportedModuleError, match="top-level module"):
        fl.LoRA(Raw((3, 4)), fl.LoraConfig(target_parameters=["w"]))


# --- vmap and RNNs --------------------------------------------------------------------------------
class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0])


def test_vmap_reaching_an_lstm_says_so_and_points_to_route():
    torch.manual_seed(0)
    model, ids = Tagger(), torch.randint(0, 10, (2, 5))
    lora = fl.LoRA(model, fl.LoraConfig(target_parameters=["lstm.weight_ih_l0"], r=2))
    stacked = fl.stack([random_adapter(lora, seed=i) for i in range(3)])
    with pytest.raises(RuntimeError) as info:
        torch.func.vmap(lora, in_dims=(0, None))(stacked, ids)
    message = str(info.value)
    assert message.startswith("LoRA: torch.func.vmap cannot run this model: it contains LSTM at ['lstm']")
    assert "no batching rule for aten::lstm" in message
    assert "lora.route(stacked, index, x)" in message and "fl.select(stacked, i)" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # the loop it recommends works
    outs = [lora(fl.select(stacked, i), ids) for i in range(3)]
    assert len(outs) == 3 and outs[0].shape == (2, 5, 3)


def test_vmap_works_when_the_lstm_sees_no_batched_tensor():
    """An LSTM before every adapted layer gets plain tensors under vmap: no error there."""
    torch.manual_seed(0)
    model, ids = Tagger(), torch.randint(0, 10, (2, 5))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["head"], r=2))
    adapters = [random_adapter(lora, seed=i) for i in range(3)]
    outs = torch.func.vmap(lora, in_dims=(0, None))(fl.stack(adapters), ids)
    for i, a in enumerate(adapters):
        torch.testing.assert_close(outs[i], lora(a, ids), **TOL)
