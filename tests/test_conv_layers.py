"""Conv LoRA: right where PEFT 0.21.2 is wrong, equal to PEFT where PEFT is right, grouped convs.

PEFT builds the LoRA branch as ``conv_B(conv_A(x))`` with only the base kernel size, stride and
padding copied, so dilation and padding_mode are lost (peft#3697), and its merge takes a 2-D
1×1 shortcut that crashes on Conv3d kernels like (1, 1, k) (peft#3768). funclora's branch uses
the layer's own conv call, so merged and unmerged outputs agree for every conv.
"""

import copy
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings

import funclora as fl
from funclora.testing import check_rule, conv_cases, random_adapter
from peft_reference import load_into_peft


def _reference_delta(adapter, scaling):
    """``s·ΔW[o, i, k…] = s·Σ_ρ B[o, ρ]·A[ρ, i, k…]`` written out independently of funclora."""
    A, B = adapter["lora_A"], adapter["lora_B"]
    return scaling * torch.einsum("or,ri...->oi...", B.flatten(1), A)


def _setup(conv, r=2):
    model = nn.Sequential(conv)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * r))
    return model, lora, random_adapter(lora, seed=1)


def _peft(model, adapter, r):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "groups > 1: merging is not supported" notice
        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * r))
    load_into_peft(peft_model, adapter)
    return peft_model


WHERE_PEFT_IS_WRONG = {
    "conv2d_dilation": (lambda: nn.Conv2d(3, 5, 3, padding=2, dilation=2), (2, 3, 9, 9)),
    "conv1d_dilation_stride": (lambda: nn.Conv1d(3, 5, 3, stride=2, dilation=3), (2, 3, 17)),
    "conv2d_reflect": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (2, 3, 7, 7)),
    "conv2d_circular": (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular"), (2, 3, 7, 7)),
    "conv1d_replicate_same": (lambda: nn.Conv1d(3, 5, 3, padding="same", padding_mode="replicate"), (2, 3, 9)),
    "conv3d_11k": (lambda: nn.Conv3d(2, 4, (1, 1, 3)), (2, 2, 3, 4, 5)),
    "conv3d_111": (lambda: nn.Conv3d(2, 4, 1), (2, 2, 3, 4, 5)),
    "conv3d_dilation_circular": (lambda: nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 2, 2), dilation=2,
                                                   padding_mode="circular"), (1, 2, 3, 7, 7)),
}


@pytest.mark.parametrize("name", list(WHERE_PEFT_IS_WRONG))
def test_merge_equals_apply_where_peft_is_wrong(name):
    make, shape = WHERE_PEFT_IS_WRONG[name]
    torch.manual_seed(0)
    model, lora, adapter = _setup(make())
    x = torch.randn(shape)
    conv, s = model[0], lora.plan.targets["0"].scaling

    out = lora(adapter, x)
    merged = lora.merge(adapter)
    torch.testing.assert_close(merged["0.weight"], conv.weight + _reference_delta(adapter["0"], s))
    # the layer's own conv (its dilation, padding_mode, …) run with the merged kernel
    reference = conv._conv_forward(x, merged["0.weight"], conv.bias)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.func.functional_call(model, merged, (x,)), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora.unmerge(merged, adapter)["0.weight"], conv.weight, atol=1e-6, rtol=1e-6)


def test_peft_is_wrong_on_these_convs_and_funclora_is_not():
    """Pins PEFT 0.21.2's behaviour so that the claim above stays true (see the module docstring)."""
    torch.manual_seed(0)
    # dilation: PEFT's branch has another spatial size -> its forward crashes
    model, lora, adapter = _setup(nn.Conv2d(3, 5, 3, padding=2, dilation=2))
    x = torch.randn(2, 3, 9, 9)
    with pytest.raises(RuntimeError):
        _peft(model, adapter, 2)(x)
    # padding_mode: PEFT's branch pads with zeros -> its output differs from its own merged model
    model, lora, adapter = _setup(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"))
    x = torch.randn(2, 3, 7, 7)
    peft_model = _peft(model, adapter, 2)
    peft_out = peft_model(x)
    assert (peft_out - lora(adapter, x)).abs().max() > 1e-3
    merged_peft = peft_model.merge_and_unload()
    torch.testing.assert_close(merged_peft(x), lora(adapter, x), atol=1e-5, rtol=1e-5)  # PEFT's merge is right
    # Conv3d (1, 1, k): PEFT's forward is right, its merge crashes; funclora's merge works
    model, lora, adapter = _setup(nn.Conv3d(2, 4, (1, 1, 3)))
    x = torch.randn(2, 2, 3, 4, 5)
    peft_model = _peft(model, adapter, 2)
    torch.testing.assert_close(peft_model(x), lora(adapter, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError):
        peft_model.merge_and_unload()
    torch.testing.assert_close(torch.func.functional_call(model, lora.merge(adapter), (x,)), lora(adapter, x),
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases(dilation=False, padding_modes=("zeros",)))
def test_same_outputs_as_peft_where_peft_is_right(case):
    """Stride, padding (incl. "same"), kernels, groups and ranks: same values → PEFT's outputs."""
    conv = case.build()
    model, lora, _ = _setup(conv, case.r)
    adapter = random_adapter(lora, seed=3)
    peft_model = _peft(model, adapter, case.r)
    peft_params = dict(peft_model.named_parameters())
    for leaf, t in adapter["0"].items():
        assert tuple(peft_params[f"base_model.model.0.{leaf}.default.weight"].shape) == tuple(t.shape)
    (x,) = case.inputs
    torch.testing.assert_close(lora(adapter, x), peft_model(x), atol=1e-5, rtol=1e-5)
    if conv.groups == 1 and not (isinstance(conv, nn.Conv3d) and conv.kernel_size[:2] == (1, 1)):
        merged_peft = dict(peft_model.merge_and_unload().named_parameters())
        torch.testing.assert_close(lora.merge(adapter)["0.weight"], merged_peft["0.weight"], atol=1e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases())
def test_conv_laws_over_shapes(case):
    """in/out channels, kernel sizes, strides, paddings, dilations, padding modes, groups, ranks."""
    report = check_rule(case.factory, inputs=case.inputs, r=case.r)
    if case.build().groups > 1:
        assert "merge equals apply" in report.skipped
    else:
        assert "merge equals apply" in report.checked


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "unbatched"])
def test_eager_branch_into_output_equals_the_conv_path(layout):
    # Eager: s·B@h is added into the base output by one batched matmul (in place without grad);
    # under torch.func (and for other layouts) the branch is a 1×1 conv plus an add. Same values.
    conv = nn.Conv2d(6, 10, 3, padding=1)
    model = nn.Sequential(conv)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=3, lora_alpha=7))  # s = 7/3
    adapter = random_adapter(lora, seed=4)
    x = torch.randn(2, 6, 5, 5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "unbatched":
        x = x[0]
    expected = conv(x) + torch.func.functional_call(
        conv, {"weight": _reference_delta(adapter["0"], 7 / 3), "bias": torch.zeros(10)}, (x,))

    def loss(a):
        return lora(a, x).square().sum()

    with torch.no_grad():
        torch.testing.assert_close(lora(adapter, x), expected, atol=1e-5, rtol=1e-5)
    eager_leaves = {k: v.clone().requires_grad_() for k, v in adapter["0"].items()}
    loss({"0": eager_leaves}).backward()
    func_grads = torch.func.grad(loss)(adapter)["0"]
    for k in eager_leaves:
        torch.testing.assert_close(eager_leaves[k].grad, func_grads[k], atol=1e-4, rtol=1e-5)


# --- grouped convs -------------------------------------------------------------------------------
def _grouped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 12, 3, groups=3, stride=2))
    config = fl.LoraConfig(target_modules=["0", "2"], r=3, lora_alpha=6)
    lora = fl.LoRA(model, config)
    return model, config, lora, random_adapter(lora, seed=2), torch.randn(2, 4, 8, 8)


def test_grouped_conv_keeps_peft_factor_shapes_and_forward():
    model, config, lora, adapter, x = _grouped()
    assert lora.shapes()["2"] == {"lora_A": (3, 6, 3, 3), "lora_B": (12, 1, 1, 1)}  # A full, B grouped
    import peft

    with pytest.warns(UserWarning, match="groups > 1"):
        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["0", "2"], r=3, lora_alpha=6))
    load_into_peft(peft_model, adapter)
    torch.testing.assert_close(lora(adapter, x), peft_model(x), atol=1e-5, rtol=1e-5)


def test_grouped_conv_merge_refuses_naming_the_layer_and_why():
    model, config, lora, adapter, x = _grouped()
    for call in (lambda: lora.merge(adapter), lambda: lora.delta(adapter)):
        with pytest.raises(NotImplementedError) as info:
            call()
        message = str(info.value)
        assert "'2'" in message and "Conv2d has groups=3" in message
        assert "not a grouped kernel" in message and "keep the adapter unmerged" in message
    with pytest.raises(NotImplementedError, match="groups=3"):
        fl.get_peft_model(model, config).merge_and_unload()


def test_grouped_conv_peft_files_load_both_ways():
    import peft

    model, config, lora, adapter, x = _grouped()
    with pytest.warns(UserWarning, match="groups > 1"):
        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["0", "2"], r=3, lora_alpha=6))
    load_into_peft(peft_model, adapter)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        loaded, _ = fl.load_adapter(folder, model=model)
    torch.testing.assert_close(lora(loaded, x), peft_model(x), atol=1e-5, rtol=1e-5)
    with tempfile.TemporaryDirectory() as folder:
        fl.save_adapter(folder, adapter, lora=lora)
        assert os.path.exists(os.path.join(folder, "adapter_model.safetensors"))
        with pytest.warns(UserWarning, match="groups > 1"):
            again = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder)
    torch.testing.assert_close(again(x), lora(adapter, x), atol=1e-5, rtol=1e-5)


def test_grouped_conv_rank_must_divide_by_groups():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4))
    with pytest.raises(fl.UnsupportedModuleError, match=r"'0' is a Conv2d with groups=4 and the rank is 6"):
        fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=6))
    fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=6, rank_pattern={"0": 8}))  # the fix it names
