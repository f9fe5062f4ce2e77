"""Quantized bases. bitsandbytes ``Linear4bit`` (nf4 / fp4) and ``Linear8bitLt`` get the LoRA
branch on their output (funclora/core/quantized.py), equal to PEFT's QLoRA; a quantized or packed
weight funclora has no rule for is refused at ``fl.LoRA(...)``, naming the layer and the fix
(before, a ``Linear4bit`` target got uint8 factors and its forward silently ignored the adapter).
"""

import copy
import gc

import warnings

import pytest
import torch
from torch import nn

import funclora as fl


KINDS = [("nf4", torch.float32, False), ("fp4", torch.float32, False), ("nf4", torch.bfloat16, False),
         ("nf4", torch.float32, True), ("int8", torch.float32, False)]


def _quantized_mlp(kind, compute, double_quant):
    """An MLP whose two Linears are bitsandbytes layers holding a fixed dense model's weights."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))   # widths: multiples of bnb's CPU blocks
    for i in (0, 2):
        dense = model[i]
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, compute_dtype=compute,
                                      quant_type=kind, compress_statistics=double_quant)
        layer.load_state_dict(dense.state_dict())
        model[i] = layer.to("cpu")
    return model


def _adapter(lora, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {p: {k: (0.2 * torch.randn(v.shape, generator=g)).requires_grad_() for k, v in leaves.items()}
            for p, leaves in lora.init().items()}


@pytest.mark.parametrize("kind, compute, double_quant", KINDS)
def test_qlora_equals_peft(kind, compute, double_quant, tmp_path):
    """Outputs, gradients and files against PEFT 0.21.2's QLoRA on the same quantized model."""
    import peft
    from peft_reference import load_into_peft, peft_grads

    model = _quantized_mlp(kind, compute, double_quant)     # train mode: bitsandbytes repacks nothing
    config = dict(target_modules=["0", "2"], r=4, lora_alpha=8, modules_to_save=None)
    lora = fl.LoRA(model, fl.LoraConfig(**config))
    adapter, x = _adapter(lora), torch.randn(5, 64)
    assert {t.dtype for leaves in adapter.values() for t in leaves.values()} == {torch.float32}   # as PEFT's
    base = copy.deepcopy(model)
    base.is_loaded_in_8bit, base.is_loaded_in_4bit = kind == "int8", kind != "int8"   # as from_pretrained sets
    twin = peft.get_peft_model(base, peft.LoraConfig(**config))
    assert type(twin.base_model.model[0]).__module__ == "peft.tuners.lora.bnb"     # PEFT's own QLoRA layer
    load_into_peft(twin, adapter)
    ours, theirs = lora(adapter, x), twin(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - model(x)).abs().max() > 0.1                     # the adapter is applied
    assert lora.num_parameters() == twin.get_nb_trainable_parameters()   # 4-bit weights counted as PEFT does
    ours.square().sum().backward()
    theirs.square().sum().backward()
    for path, leaves in peft_grads(twin, adapter).items():
        for leaf, g in leaves.items():
            torch.testing.assert_close(adapter[path][leaf].grad, g, rtol=1e-5, atol=1e-6)
    fl.save_adapter(tmp_path / "ours", adapter, lora=lora)          # files both ways
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).train()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), lora(adapter, x), rtol=0, atol=1e-5)
    twin.save_pretrained(str(tmp_path / "peft"))
    back, _ = fl.load_adapter(tmp_path / "peft", model=model)
    with torch.no_grad():
        torch.testing.assert_close(lora(back, x), twin(x), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching")
def test_qlora_leaves_the_model_alone_and_refuses_what_it_cannot_place():
    """The view adds the branch and never repacks the user's weight; merge and compile refuse."""
    import peft
    from peft_reference import load_into_peft

    model = _quantized_mlp("nf4", torch.float32, False).eval()
    weights = [model[i].weight.data.clone() for i in (0, 2)]
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], r=4))
    adapter, x = _adapter(lora), torch.randn(5, 64)
    with torch.no_grad():
        first = lora(adapter, x)                           # eval, no gradients: where bitsandbytes repacks
    assert all(torch.equal(model[i].weight.data, w) for i, w in zip((0, 2), weights))
    assert not getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["0", "2"], r=4)).eval()
    load_into_peft(twin, adapter)
    with torch.no_grad():
        model(x)                 # the user's own eval forward: bitsandbytes may repack (AVX512-BF16 CPUs)
        twin(x)
        torch.testing.assert_close(lora(adapter, x), twin(x), rtol=0, atol=1e-5)   # funclora = PEFT either way
        torch.testing.assert_close(lora(adapter, x), first, rtol=0, atol=0.05)     # bf16 kernel if repacked
    stacked = fl.stack([adapter, {p: {k: v * 2 for k, v in ls.items()} for p, ls in adapter.items()}])
    with torch.no_grad():
        routed = lora.route(stacked, [1, 0, 0, 1, 1], x)
        torch.testing.assert_close(routed[1:3], lora(adapter, x)[1:3], rtol=0, atol=1e-6)
    other = _adapter(lora, 2)
    with torch.no_grad():
        many = torch.func.vmap(lora, in_dims=(0, None))(fl.stack([adapter, other]), x)   # vmap over 4-bit layers
        torch.testing.assert_close(many[1], lora(other, x), rtol=0, atol=1e-5)
    int8 = _quantized_mlp("int8", torch.float32, False)          # vmap and grad over 8-bit layers too
    lora8 = fl.LoRA(int8, fl.LoraConfig(target_modules=["0", "2"], r=4))
    a8, b8 = _adapter(lora8), _adapter(lora8, 2)
    with torch.no_grad():
        many = torch.func.vmap(lora8, in_dims=(0, None))(fl.stack([a8, b8]), x)
        torch.testing.assert_close(many[1], lora8(b8, x), rtol=1e-5, atol=1e-5)
    grads = torch.func.grad(lambda a: lora8(a, x).square().sum())(a8)
    lora8(a8, x).square().sum().backward()
    torch.testing.assert_close(grads["2"]["lora_B"], a8["2"]["lora_B"].grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(NotImplementedError, match=r"LoRA.merge: cannot form the update of '0'.*quantized"):
        lora.merge(adapter)
    step = torch.compile(lambda a: lora(a, x), fullgraph=True)
    with pytest.raises(Exception, match=r"'0' \(Linear4bit\) gets its LoRA branch on its output"):
        step(adapter)
    assert type(model[0]).__name__ == "Linear4bit" and "forward" not in model[0].__dict__


def _hooked(module, *args, **kwargs):
    return module._old_forward(*args, **kwargs)


def test_a_hooked_quantized_layer_still_gets_its_branch():
    """accelerate (device_map=...) replaces a layer's forward by partial(new_forward, layer): the
    view's branch wraps that instance forward instead of being bypassed by it."""
    import functools

    model = _quantized_mlp("nf4", torch.float32, False)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], r=4))
    adapter, x = _adapter(lora), torch.randn(5, 64)
    with torch.no_grad():
        want = lora(adapter, x)
        for i in (0, 2):
            layer = model[i]
            layer._old_forward = layer.forward
            layer.forward = functools.update_wrapper(functools.partial(_hooked, layer), layer._old_forward)
        hooked = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], r=4))
        torch.testing.assert_close(hooked(adapter, x), want, rtol=0, atol=0)


def test_torchao_int8_weight_only_equals_peft(tmp_path):
    """torchao's quantize_ keeps nn.Linear with an Int8Tensor weight: the branch goes on the output,
    outputs / gradients / files equal PEFT's TorchaoLoraLinear; vmap works over it."""
    import peft
    from peft_reference import load_into_peft, peft_grads

    quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    config = dict(target_modules=["0", "2"], r=4, lora_alpha=8)
    lora = fl.LoRA(model, fl.LoraConfig(**config))
    assert [type(t.rule).__name__ for t in lora.plan.targets.values()] == ["OutputRule", "OutputRule"]
    adapter, x = _adapter(lora), torch.randn(5, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PEFT: "instantiated without get_apply_tensor_subclass" (merge off)
        twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    load_into_peft(twin, adapter)
    ours, theirs = lora(adapter, x), twin(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    for path, leaves in peft_grads(twin, adapter).items():
        for leaf, g in leaves.items():
            torch.testing.assert_close(adapter[path][leaf].grad, g, rtol=1e-5, atol=1e-6)
    fl.save_adapter(tmp_path, adapter, lora=lora)
    back, _ = fl.load_adapter(tmp_path, model=model)
    other = _adapter(lora, 2)
    with torch.no_grad():
        torch.testing.assert_close(lora(back, x), ours, rtol=0, atol=0)
        many = torch.func.vmap(lora, in_dims=(0, None))(fl.stack([adapter, other]), x)
        torch.testing.assert_close(many[1], lora(other, x), rtol=0, atol=1e-5)
    assert type(model[0].weight).__name__ == "Int8Tensor"


def test_a_torchao_folder_records_no_custom_rule_and_loads_onto_the_unquantized_model(tmp_path):
    """The output rule of a torchao layer is built in: the file must not record it as a custom rule for
    every nn.Linear (loading would then put every Linear of another model on the output rule)."""
    import json

    from safetensors import safe_open

    quantization = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    model = copy.deepcopy(dense)
    quantization.quantize_(model[0], quantization.Int8WeightOnlyConfig())
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], r=4))
    assert [type(t.rule).__name__ for t in lora.plan.targets.values()] == ["OutputRule", "LinearRule"]
    fl.save_adapter(tmp_path, _adapter(lora), lora=lora)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["funclora"])["custom_rules"] == []
    adapter, config = fl.load_adapter(tmp_path, model=dense)
    assert config._custom_modules == {}
    onto = fl.LoRA(dense, config)
    assert [type(t.rule).__name__ for t in onto.plan.targets.values()] == ["LinearRule", "LinearRule"]
    onto.merge(adapter)                                    # plain Linear layers merge


def _dense_copies(shapes) -> int:
    """How many float tensors of the given weight shapes are alive (a dequantized weight would be one)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter) and o.is_floating_point()
               and tuple(o.shape) in shapes)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_no_dequantized_copy_outlives_a_call(kind):
    model = _quantized_mlp(kind, torch.float32, False)
    shapes = {(128, 64), (64, 128)}
    before = _dense_copies(shapes)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], r=4))
    adapter, x = _adapter(lora), torch.randn(5, 64)
    lora(adapter, x).sum().backward()
    with torch.no_grad():
        bound = lora.bind(adapter)
        bound(x)
    del bound
    assert _dense_copies(shapes) == before == 0


class PackedLinear(nn.Linear):
    """Like a GPTQ / AWQ layer: an nn.Linear subclass whose weight is packed integers."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // 4, dtype=torch.int32),
                                   requires_grad=False)


def test_integer_weights_of_any_layer_are_refused_and_user_rules_decide_for_themselves():
    """GPTQ / AWQ / HQQ-like layers: no rule knows their packing, so targeting them raises."""
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
