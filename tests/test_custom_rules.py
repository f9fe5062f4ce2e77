"""User rules: the documented example runs, registration (global and per config), precedence over
the built-ins, a factored user rule, and a rule for a module type of the user's own."""

import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import funclora as fl
from funclora.rules import LoraParts, lora_weight
from funclora.rules import LinearRule, find_rule, supported_types
from funclora.testing import check_rule, random_adapter


def _docstring_example(doc: str, marker: str) -> str:
    """The ``::`` literal block that follows ``marker`` in a docstring, dedented."""
    lines = doc[doc.index(marker):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("::")) + 1
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


def test_the_rule_guide_example_runs_and_fits_a_screenful():
    code = _docstring_example(fl.rules.__doc__, "Example — LoRA on all four gates")
    rule_source = code[code.index("class LSTMRule"):code.index("model = ")]
    assert len(rule_source.strip().splitlines()) <= 20  # "a screenful"
    namespace = {"__name__": "rules_guide_example"}
    exec(compile(code, "funclora.rules docstring", "exec"), namespace)
    lora = namespace["lora"]
    assert lora.shapes()["0"]["weight_ih_l0.lora_A"] == (4, 8)
    assert set(lora.shapes()["0"]) == {f"weight_{k}_l{layer}.lora_{f}" for k in ("ih", "hh") for layer in (0, 1)
                                       for f in "AB"}


class Marked(LinearRule):
    """The built-in Linear rule under another name, so a test can see which rule was picked."""


class Other(LinearRule):
    pass


def test_user_rules_win_over_builtins_globally_and_per_config():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert type(fl.LoRA(model, fl.LoraConfig(target_modules=["0"])).plan.targets["0"].rule) is LinearRule
    fl.register_rule(nn.Linear, Marked())
    try:
        assert type(fl.LoRA(model, fl.LoraConfig(target_modules=["0"])).plan.targets["0"].rule) is Marked
        assert any(name.endswith("Linear") for name in supported_types())
        config = fl.LoraConfig(target_modules=["0"])
        config.register_custom_module({nn.Linear: Other})  # a class is instantiated
        assert type(fl.LoRA(model, config).plan.targets["0"].rule) is Other  # config beats global
    finally:
        fl.unregister_rule(nn.Linear)
    assert type(fl.LoRA(model, fl.LoraConfig(target_modules=["0"])).plan.targets["0"].rule) is LinearRule


def test_registration_follows_subclasses_and_insertion_order():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(3, 4))
    assert type(find_rule(model[0])) is LinearRule  # built-in by MRO
    config = fl.LoraConfig(target_modules=["0"])
    config._register_custom_module({nn.Linear: Marked()})  # PEFT's private name works too
    config._register_custom_module({MyLinear: Other()})     # later entries are tried later
    assert type(fl.LoRA(model, config).plan.targets["0"].rule) is Marked
    fl.register_rule(MyLinear, Other())
    try:
        assert type(find_rule(model[0])) is Other and type(find_rule(nn.Linear(2, 2))) is LinearRule
    finally:
        fl.unregister_rule(MyLinear)


def test_registration_rejects_what_is_not_a_rule():
    class PeftStyleLayer(nn.Module):  # what PEFT's guide registers: a LoraLayer module class
        pass

    with pytest.raises(TypeError, match="must be a funclora.Rule .*PEFT's LoraLayer classes do not apply"):
        fl.register_rule(nn.LSTM, PeftStyleLayer)
    with pytest.raises(TypeError, match="must be a funclora.Rule"):
        fl.LoraConfig(target_modules=["x"]).register_custom_module({nn.LSTM: PeftStyleLayer})
    with pytest.raises(TypeError, match="keys must be module types"):
        fl.LoraConfig(target_modules=["x"]).register_custom_module({"nn.LSTM": LinearRule()})
    with pytest.raises(TypeError, match="must be a class such as nn.LSTM"):
        fl.register_rule(nn.LSTM(2, 2), LinearRule())


# --- a module type of the user's own ---------------------------------------------------------------
class Gated(nn.Module):
    """``y = (x @ Wvᵀ) * sigmoid(x @ Wgᵀ)``: two weight matrices, consumed with F.linear."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.value = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.gate = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x):
        return F.linear(x, self.value) * torch.sigmoid(F.linear(x, self.gate))


class GatedRule(fl.Rule):
    """Both matrices of a Gated, computed factored (the lazy weight) in the forward."""

    supports_dropout = True

    def updated_parameters(self, module):
        return ("value", "gate")

    def factors(self, module, r):
        d_out, d_in = module.value.shape
        return {f"{n}.lora_{f}": fl.Factor((r, d_in) if f == "A" else (d_out, r), f)
                for n in ("value", "gate") for f in "AB"}

    def delta(self, module, factors, scaling):
        return {n: scaling * (factors[f"{n}.lora_B"] @ factors[f"{n}.lora_A"]) for n in ("value", "gate")}

    def overlay(self, module, params, factors, scaling, *, dropout=0.0, path=""):
        return {n: lora_weight(LoraParts(params[n], factors[f"{n}.lora_A"], factors[f"{n}.lora_B"], scaling,
                                         "linear", dropout, f"{path}.{n}")) for n in ("value", "gate")}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Gated(6, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_a_factored_user_rule_keeps_the_laws_and_never_materializes():
    report = check_rule(lambda: Gated(6, 8), GatedRule(), inputs=(torch.randn(4, 6),))
    assert report.skipped == {}
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 6)
    with pytest.raises(fl.UnsupportedModuleError, match="Gated.*has no LoRA rule"):
        fl.LoRA(model, fl.LoraConfig(target_modules=["block", "head"]))
    config = fl.LoraConfig(target_modules=["block", "head"], r=2)
    config.register_custom_module({Gated: GatedRule()})
    lora = fl.LoRA(model, config)
    adapter = random_adapter(lora)
    with fl.strict():  # the two matrices go through F.linear factored: no dense B@A
        out = lora(adapter, x)
    torch.testing.assert_close(torch.func.functional_call(model, lora.merge(adapter), (x,)), out,
                               atol=1e-5, rtol=1e-5)


def test_a_user_rule_trains_through_the_peft_facade():
    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(32, 6), torch.randint(0, 2, (32,))
    config = fl.LoraConfig(target_modules=["block"], r=4, lora_alpha=8)
    config.register_custom_module({Gated: GatedRule})
    peft_model = fl.get_peft_model(model, config, generator=torch.Generator().manual_seed(0))
    assert peft_model.targeted_module_names == ["block"]
    assert sorted(n for n, _ in peft_model.named_parameters()) == [
        "block.gate.lora_A", "block.gate.lora_B", "block.value.lora_A", "block.value.lora_B"]
    optimizer = torch.optim.Adam(peft_model.parameters(), lr=3e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(peft_model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the user's model is untouched


def test_a_rule_can_refuse_an_instance_with_its_own_words():
    class OnlySquare(GatedRule):
        def check(self, module, r, path):
            if module.value.shape[0] != module.value.shape[1]:
                raise fl.UnsupportedModuleError(f"OnlySquare: {path!r} is not square; target another layer.")

    config = fl.LoraConfig(target_modules=["block"])
    config.register_custom_module({Gated: OnlySquare()})
    with pytest.raises(fl.UnsupportedModuleError, match="'block' is not square"):
        fl.LoRA(Net(), config)
