"""Quantized or packed base weights are refused at ``fl.LoRA(...)``, naming the layer and the fix.

funclora has no QLoRA rules yet. Before this check, a bitsandbytes ``Linear4bit`` target got
uint8 factors and its forward silently ignored the adapter; now every such layer raises up
front (and factors are never made in a non-float dtype).
"""

import warnings

import pytest
import torch
from torch import nn

import funclora as fl


def _bnb_layers():
    bnb = pytest.importorskip("bitsandbytes")
    dense = nn.Linear(16, 8)
    layers = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # bitsandbytes' notes about its CPU kernels
        for name, layer in [("nf4", bnb.nn.Linear4bit(16, 8, compute_dtype=torch.float32, quant_type="nf4")),
                            ("fp4", bnb.nn.Linear4bit(16, 8, compute_dtype=torch.bfloat16, quant_type="fp4")),
                            ("int8", bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False))]:
            layer.load_state_dict(dense.state_dict())
            layers[name] = layer.to("cpu")
    return layers


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_bitsandbytes_layers_are_refused_up_front(kind):
    layer = _bnb_layers()[kind]
    model = nn.Sequential(nn.Linear(16, 16), layer)
    with pytest.raises(fl.UnsupportedModuleError,
                       match=r"target '1' \(bitsandbytes\.nn\.modules\.Linear(4bit|8bitLt)\).*(uint8|int8).*"
                             r"exclude_modules.*fl\.register_rule"):
        fl.LoRA(model, fl.LoraConfig(target_modules=["0", "1"]))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "1"], exclude_modules=["1"]))   # the fix
    assert lora.targeted_module_names == ["0"]


def test_torchao_quantized_linear_is_refused():
    quantization = pytest.importorskip("torchao.quantization")
    model = nn.Sequential(nn.Linear(16, 8))
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    with pytest.raises(fl.UnsupportedModuleError, match=r"target '0' .*torchao.*Int8Tensor.*quantized or packed"):
        fl.LoRA(model, fl.LoraConfig(target_modules=["0"]))


class PackedLinear(nn.Linear):
    """Like a GPTQ / AWQ layer: an nn.Linear subclass whose weight is packed integers."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // 4, dtype=torch.int32),
                                   requires_grad=False)


def test_integer_weights_of_any_layer_are_refused_and_user_rules_decide_for_themselves():
    model = nn.Sequential(PackedLinear(16, 8))
    with pytest.raises(fl.UnsupportedModuleError, match=r"target '0' \(.*PackedLinear\).*torch\.int32"):
        fl.LoRA(model, fl.LoraConfig(target_modules="all-linear"))
    with pytest.raises(fl.UnsupportedModuleError, match=r"'0\.weight'.*torch\.int32"):
        fl.LoRA(model, fl.LoraConfig(target_parameters=["0.weight"]))

    class OutputRule(fl.Rule):      # a user rule with its own overlay handles the weight its own way
        def factors(self, module, r):
            return {"lora_A": fl.Factor((r, module.in_features), "A"), "lora_B": fl.Factor((module.out_features, r), "B")}

        def overlay(self, module, params, factors, scaling, *, dropout=0.0, path=""):
            return {}

    config = fl.LoraConfig(target_modules=["0"], r=2)
    config.register_custom_module({PackedLinear: OutputRule()})
    assert fl.LoRA(model, config).targeted_module_names == ["0"]


def test_factors_are_never_made_in_a_non_float_dtype():
    lora = fl.LoRA(nn.Sequential(nn.Linear(4, 4)), fl.LoraConfig(target_modules=["0"], r=2))
    for dtype in (torch.int8, torch.uint8, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=r"LoRA.init: LoRA factors must have a real floating-point dtype"):
            lora.init(dtype=dtype)
