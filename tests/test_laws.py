"""The algebraic laws, with hypothesis over small random models, configs and ranks, LoRA and DoRA."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import funclora as fl
from conftest import random_adapter

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def mlp_cases(draw):
    sizes = draw(st.lists(st.integers(1, 9), min_size=2, max_size=4))
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b, bias=draw(st.booleans())), nn.Tanh()]
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    model = nn.Sequential(*layers[:-1])
    linear = [str(i) for i in range(0, len(layers) - 1, 2)]
    targets = draw(st.lists(st.sampled_from(linear), min_size=1, unique=True))
    rest = [n for n in linear if n not in targets]
    saved = draw(st.lists(st.sampled_from(rest), unique=True)) if rest else []
    config = fl.LoraConfig(target_modules=targets, modules_to_save=saved or None, r=draw(st.integers(1, 6)),
                           lora_alpha=draw(st.sampled_from([1, 4, 8, 16])), use_rslora=draw(st.booleans()),
                           use_dora=draw(st.booleans()))
    x = torch.randn(draw(st.integers(1, 4)), sizes[0])
    return model, config, x


@st.composite
def conv_cases(draw):
    dim = draw(st.sampled_from([1, 2]))
    Conv = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
    groups = draw(st.sampled_from([1, 1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    conv = Conv(cin, cout, k, stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 2)),
                dilation=draw(st.integers(1, 2)), groups=groups,
                padding_mode=draw(st.sampled_from(["zeros", "reflect", "circular"])))
    model = nn.Sequential(conv)
    r = groups * draw(st.integers(1, 3))
    x = torch.randn(2, cin, *([draw(st.integers(6, 9))] * dim))
    return model, fl.LoraConfig(target_modules=["0"], r=r, use_dora=draw(st.booleans())), x


cases = st.one_of(mlp_cases(), conv_cases())


@SETTINGS
@given(cases)
def test_fresh_adapter_changes_nothing(case):
    model, config, x = case
    lora = fl.LoRA(model, config)
    torch.testing.assert_close(lora(lora.init(), x), model(x), atol=0, rtol=0)


@SETTINGS
@given(mlp_cases() | conv_cases().filter(lambda c: c[0][0].groups == 1))
def test_merge_equals_apply_and_unmerge_inverts_merge(case):
    model, config, x = case
    lora = fl.LoRA(model, config)
    adapter = random_adapter(lora, scale=0.3)
    merged = lora.merge(adapter)
    torch.testing.assert_close(lora(adapter, x), torch.func.functional_call(model, merged, (x,)),
                               atol=1e-5, rtol=1e-5)
    params = lora.unmerge(merged, adapter)
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p, atol=1e-6, rtol=1e-6)


@SETTINGS
@given(cases, st.integers(1, 4))
def test_vmap_over_a_stack_equals_the_loop(case, n):
    model, config, x = case
    lora = fl.LoRA(model, config)
    adapters = [random_adapter(lora, seed=i) for i in range(n)]
    outs = torch.func.vmap(lora, in_dims=(0, None))(fl.stack(adapters), x)
    for i, a in enumerate(adapters):
        torch.testing.assert_close(outs[i], lora(a, x), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(cases, st.integers(1, 3))
def test_stack_unstack_select_round_trip(case, n):
    model, config, x = case
    lora = fl.LoRA(model, config)
    adapters = [random_adapter(lora, seed=i) for i in range(n)]
    stacked = fl.stack(adapters)
    for i, a in enumerate(fl.unstack(stacked)):
        for p in a:
            for k in a[p]:
                assert torch.equal(a[p][k], adapters[i][p][k])
                assert torch.equal(fl.select(stacked, i)[p][k], adapters[i][p][k])


@SETTINGS
@given(mlp_cases())
def test_grad_of_functional_forward_equals_backward(case):
    model, config, x = case
    lora = fl.LoRA(model, config)
    adapter = random_adapter(lora)
    grads = torch.func.grad(lambda a: lora(a, x).square().sum())(adapter)
    leaves = {p: {k: v.clone().requires_grad_() for k, v in d.items()} for p, d in adapter.items()}
    lora(leaves, x).square().sum().backward()
    for p in grads:
        for k in grads[p]:
            torch.testing.assert_close(grads[p][k], leaves[p][k].grad)


def test_stack_rejects_adapters_of_different_configs():
    model = nn.Sequential(nn.Linear(3, 3))
    a = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2)).init()
    b = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=3)).init()
    with pytest.raises(ValueError, match=r"adapter 1\['0'\]\['lora_A'\] has shape \(3, 3\), adapter 0 has \(2, 3\)"):
        fl.stack([a, b])
    with pytest.raises(ValueError, match="no adapters"):
        fl.stack([])


def test_stack_and_select_say_what_is_wrong():
    """A dict instead of a list, a structure mismatch (named, not a 2,000-character dump), mixed
    mapping types (accepted), and select on an unstacked adapter (it sliced every leaf)."""
    from collections import OrderedDict

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    a = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "1"], r=2)).init()
    with pytest.raises(TypeError, match=r"stack: pass a list of adapters .*got a dict \(one adapter\? wrap it"):
        fl.stack(a)
    with pytest.raises(ValueError, match=r"adapter 1 has other module paths than adapter 0: missing \['1'\], unexpected \[\]"):
        fl.stack([a, {"0": a["0"]}])
    with pytest.raises(ValueError, match=r"adapter 1\['0'\] has leaves \['lora_A'\], adapter 0 has \['lora_A', 'lora_B'\]"):
        fl.stack([a, {"0": {"lora_A": a["0"]["lora_A"]}, "1": a["1"]}])
    with pytest.raises(TypeError, match=r"stack: adapter 1\['1'\]\['lora_B'\] is a list, expected a torch.Tensor"):
        fl.stack([a, {"0": a["0"], "1": {"lora_A": a["1"]["lora_A"], "lora_B": [1.0]}}])
    mixed = fl.stack([OrderedDict(a), a])
    assert type(mixed) is dict and mixed["1"]["lora_B"].shape == (2, 2, 2)
    with pytest.raises(ValueError, match=r"select: the leaves have leading sizes \[2, 3\].*not stacked"):
        fl.select(a, 0)
    with pytest.raises(IndexError, match="select: index 2 is out of range for a stack of 2 adapters"):
        fl.select(mixed, 2)
