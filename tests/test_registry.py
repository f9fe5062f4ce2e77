"""funclora.core.registry: which rule serves which module type, and custom rules recorded by name."""

import json
import re

import pytest
import torch
from torch import nn

import funclora as fl
from funclora.core import registry
from funclora.core.quantized import OutputRule
from funclora.core.registry import (as_rule, behaves_as_builtin, builtin_kind, find_rule, is_factored,
                                    qualified_name, recorded_rules, register_rule, rules_in_metadata,
                                    supported_types, unregister_rule, user_rule_types, with_rules)
from funclora.core.rules import (Conv1DRule, ConvRule, EmbeddingRule, LinearRule, MultiheadAttentionRule,
                                 ParameterRule, Rule)
from funclora.errors import AdapterFileError, UnsupportedModuleError


class SubLinear(nn.Linear):
    pass


class SubSubLinear(SubLinear):
    pass


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 3))

    def forward(self, x):
        return x @ self.weight


class ScaleRule(Rule):
    def factors(self, module, r):
        return {"lora_A": fl.Factor((r, 3), "A"), "lora_B": fl.Factor((3, r), "B")}

    def delta(self, module, factors, scaling):
        return {"weight": scaling * factors["lora_B"] @ factors["lora_A"]}


class NeedsArgs(Rule):
    def __init__(self, name):
        self.name = name


class Outer:
    class InnerRule(ScaleRule):
        pass


@pytest.fixture(autouse=True)
def clean_registry():
    """Every test runs with no registered rule, and leaves the global table as it found it."""
    saved = dict(registry._USER)
    registry._USER.clear()
    yield
    registry._USER.clear()
    registry._USER.update(saved)


# --- find_rule --------------------------------------------------------------------------------
def test_builtins_by_mro():
    assert find_rule(nn.Linear(2, 2)) is registry._BUILTIN[nn.Linear]
    assert find_rule(SubSubLinear(2, 2)) is registry._BUILTIN[nn.Linear]
    assert type(find_rule(nn.Embedding(3, 2))) is EmbeddingRule
    assert [type(find_rule(c)) for c in (nn.Conv1d(1, 1, 1), nn.Conv2d(1, 1, 1), nn.Conv3d(1, 1, 1))] == [ConvRule] * 3
    assert type(find_rule(nn.MultiheadAttention(4, 1))) is MultiheadAttentionRule
    assert find_rule(nn.LSTM(2, 2)) is None and find_rule(Scale()) is None
    assert find_rule(nn.Bilinear(2, 2, 2)) is None


def test_transformers_conv1d_by_qualified_name_and_subclass():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

    class MyConv1D(Conv1D):
        pass

    assert type(find_rule(Conv1D(3, 2))) is Conv1DRule
    assert find_rule(MyConv1D(3, 2)) is find_rule(Conv1D(3, 2))


def test_registered_rule_replaces_the_builtin_for_subclasses_too():
    mine = LinearRule()
    register_rule(nn.Linear, mine)
    assert find_rule(nn.Linear(2, 2)) is mine and find_rule(SubSubLinear(2, 2)) is mine
    assert user_rule_types() == (nn.Linear,)
    unregister_rule(nn.Linear)
    assert find_rule(nn.Linear(2, 2)) is registry._BUILTIN[nn.Linear]
    unregister_rule(nn.Linear)  # unregistering twice (or a type never registered) is no error
    unregister_rule(nn.LSTM)


def test_the_nearest_class_in_the_mro_wins_whatever_the_registration_order():
    for_sub, for_linear = ScaleRule(), LinearRule()
    register_rule(SubLinear, for_sub)
    register_rule(nn.Linear, for_linear)
    assert find_rule(SubSubLinear(2, 2)) is for_sub
    assert find_rule(SubLinear(2, 2)) is for_sub
    assert find_rule(nn.Linear(2, 2)) is for_linear


def test_config_rules_win_over_registered_ones_in_insertion_order():
    registered, custom, catch_all = LinearRule(), ScaleRule(), Rule()
    register_rule(nn.Linear, registered)
    assert find_rule(SubLinear(2, 2), {SubLinear: custom}) is custom
    assert find_rule(nn.Linear(2, 2), {SubLinear: custom}) is registered   # isinstance: not a SubLinear
    assert find_rule(SubLinear(2, 2), {nn.Module: catch_all, SubLinear: custom}) is catch_all
    assert find_rule(nn.LSTM(2, 2), {nn.Module: catch_all}) is catch_all
    assert find_rule(nn.LSTM(2, 2), {}) is None and find_rule(nn.LSTM(2, 2), None) is None


def test_config_register_custom_module_feeds_find_rule():
    config = fl.LoraConfig(target_modules=["0"])
    config.register_custom_module({Scale: ScaleRule})       # a class is instantiated
    rule = find_rule(Scale(), config._custom_modules)
    assert type(rule) is ScaleRule


# --- register / as_rule / supported_types -----------------------------------------------------
def test_register_rule_takes_a_rule_class_or_instance():
    register_rule(Scale, ScaleRule)
    assert type(find_rule(Scale())) is ScaleRule
    with pytest.raises(TypeError) as info:
        register_rule("Scale", ScaleRule())
    assert str(info.value) == "register_rule: `module_type` must be a class such as nn.LSTM, got 'Scale'."


def test_as_rule_errors_name_the_module_type():
    rule = ScaleRule()
    assert as_rule(rule) is rule
    assert type(as_rule(ScaleRule)) is ScaleRule
    with pytest.raises(TypeError) as info:
        as_rule(nn.Linear, nn.LSTM)
    assert str(info.value) == (
        "funclora: the rule for LSTM must be a funclora.Rule (or a Rule subclass), got <class "
        "'torch.nn.modules.linear.Linear'>. PEFT's LoraLayer classes do not apply here; write a Rule with "
        "factors() and delta() (see funclora.rules).")
    with pytest.raises(TypeError, match=re.escape("the rule for None must be a funclora.Rule (or a Rule subclass), "
                                                  "got 'lora'.")):
        as_rule("lora")
    with pytest.raises(TypeError, match=re.escape("__init__() missing 1 required positional argument: 'name'")):
        as_rule(NeedsArgs, Scale)                           # a class needs a no-argument constructor


def test_supported_types_lists_builtins_then_registered():
    builtins = ["torch.nn.Linear", "torch.nn.Embedding", "torch.nn.Conv1d", "torch.nn.Conv2d", "torch.nn.Conv3d",
                "torch.nn.MultiheadAttention", "transformers.pytorch_utils.Conv1D",
                "bitsandbytes.nn.modules.Linear4bit", "bitsandbytes.nn.modules.Linear8bitLt"]
    assert supported_types() == builtins
    register_rule(Scale, ScaleRule())
    assert supported_types() == builtins + [f"{__name__}.Scale"]


# --- builtin_kind / behaves_as_builtin / is_factored -----------------------------------------
class Renamed(LinearRule):
    pass


class Checked(ConvRule):
    def check(self, module, r, path):
        raise UnsupportedModuleError("no")


class OwnDelta(LinearRule):
    def delta(self, module, factors, scaling):
        return {"weight": 2 * super().delta(module, factors, scaling)["weight"]}


class OwnOverlay(EmbeddingRule):
    def overlay(self, module, params, factors, scaling, *, dropout=0.0, path=""):
        return super().overlay(module, params, factors, scaling, dropout=dropout, path=path)


class OwnLayout(LinearRule):
    layout = "conv1d_t"


class OwnFactors(ParameterRule):
    def factors(self, module, r):
        return super().factors(module, r)


class OwnFileKey(MultiheadAttentionRule):
    def file_key(self, leaf):
        return leaf


class DropoutOff(LinearRule):
    supports_dropout = False                               # not behaviour of the update: still built in


@pytest.mark.parametrize("rule, kind", [
    (LinearRule(), LinearRule), (Conv1DRule(), Conv1DRule), (EmbeddingRule(), EmbeddingRule),
    (ConvRule(), ConvRule), (MultiheadAttentionRule(), MultiheadAttentionRule),
    (ParameterRule("w"), ParameterRule), (OutputRule(), OutputRule),
    (Renamed(), LinearRule), (Checked(), ConvRule), (DropoutOff(), LinearRule),
    (OwnDelta(), None), (OwnOverlay(), None), (OwnLayout(), None), (OwnFactors("w"), None), (OwnFileKey(), None),
    (ScaleRule(), None), (Rule(), None),
])
def test_builtin_kind(rule, kind):
    assert builtin_kind(rule) is kind
    assert behaves_as_builtin(rule) is (kind is not None)


def test_behaves_as_builtin_with_kinds():
    assert behaves_as_builtin(Renamed(), LinearRule)
    assert behaves_as_builtin(Renamed(), ConvRule, LinearRule)
    assert not behaves_as_builtin(Renamed(), ConvRule)
    assert behaves_as_builtin(Checked(), ConvRule)
    assert not behaves_as_builtin(OwnDelta(), LinearRule)


def test_is_factored():
    for rule in (LinearRule(), Conv1DRule(), EmbeddingRule(), ConvRule(), Renamed(), Checked()):
        assert is_factored(rule), rule
    for rule in (MultiheadAttentionRule(), ParameterRule("w"), OutputRule(), OwnDelta(), OwnLayout(), ScaleRule()):
        assert not is_factored(rule), rule


# --- recorded rules ---------------------------------------------------------------------------
def test_qualified_name():
    assert qualified_name(nn.Linear) == "torch.nn.modules.linear:Linear"
    assert qualified_name(ScaleRule) == f"{__name__}:ScaleRule"
    assert qualified_name(Outer.InnerRule) == f"{__name__}:Outer.InnerRule"


def _entry(module_type, rule) -> dict:
    return {"module_type": module_type if isinstance(module_type, str) else qualified_name(module_type),
            "rule": rule if isinstance(rule, str) else qualified_name(rule)}


def test_recorded_rules_resolve_imported_names():
    added, failed = recorded_rules([_entry(Scale, ScaleRule), _entry(SubLinear, Outer.InnerRule)], set())
    assert failed == []
    assert list(added) == [Scale, SubLinear]
    assert type(added[Scale]) is ScaleRule and type(added[SubLinear]) is Outer.InnerRule


def test_recorded_rules_skip_known_and_registered_types():
    entries = [_entry(Scale, ScaleRule), _entry(SubLinear, ScaleRule)]
    added, failed = recorded_rules(entries, {qualified_name(Scale)})
    assert list(added) == [SubLinear] and failed == []
    register_rule(SubLinear, LinearRule())
    added, failed = recorded_rules(entries, set())
    assert list(added) == [Scale] and failed == []


def test_recorded_rules_report_what_cannot_be_resolved():
    def local():
        class Hidden(ScaleRule):
            pass
        return Hidden

    entries = [
        _entry("not_imported_pkg.mod:Thing", ScaleRule),
        _entry(Scale, local()),
        _entry(Scale, f"{__name__}:Missing"),
        _entry(Scale, f"{__name__}:SubLinear"),
        _entry(Scale, f"{__name__}:NeedsArgs"),
        _entry("no_colon", ScaleRule),
    ]
    added, failed = recorded_rules(entries, set())
    assert added == {}
    assert failed == [
        ("not_imported_pkg.mod:Thing", f"{__name__}:ScaleRule",
         "LookupError: module 'not_imported_pkg.mod' is not imported (funclora never imports code a file names)"),
        (f"{__name__}:Scale", f"{__name__}:test_recorded_rules_report_what_cannot_be_resolved.<locals>.local.<locals>"
         ".Hidden", f"LookupError: '{__name__}:test_recorded_rules_report_what_cannot_be_resolved.<locals>.local."
         "<locals>.Hidden' is not an importable name (defined inside a function?)"),
        (f"{__name__}:Scale", f"{__name__}:Missing",
         f"AttributeError: module '{__name__}' has no attribute 'Missing'"),
        (f"{__name__}:Scale", f"{__name__}:SubLinear",
         f"LookupError: '{__name__}:SubLinear' is not a funclora.Rule subclass"),
        (f"{__name__}:Scale", f"{__name__}:NeedsArgs",
         "TypeError: NeedsArgs.__init__() missing 1 required positional argument: 'name'"),
        ("no_colon", f"{__name__}:ScaleRule",
         "LookupError: 'no_colon' is not an importable name (defined inside a function?)"),
    ]


def test_rules_in_metadata():
    rules = [_entry(Scale, ScaleRule)]
    assert rules_in_metadata({}, "a.safetensors", "load_adapter") == []
    assert rules_in_metadata({"funclora": "{}"}, "a.safetensors", "load_adapter") == []
    assert rules_in_metadata({"funclora": json.dumps({"custom_rules": rules, "other": 1})}, "f", "fn") == rules


@pytest.mark.parametrize("text, why", [
    ("{not json", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("[1, 2]", "'list' object has no attribute 'get'"),
    ('{"custom_rules": 3}', "'int' object is not iterable"),
    ('{"custom_rules": ["x"]}', "malformed custom_rules"),
    ('{"custom_rules": [{"module_type": "a:B"}]}', "malformed custom_rules"),
    ('{"custom_rules": [{"module_type": "a:B", "rule": 7}]}', "malformed custom_rules"),
])
def test_rules_in_metadata_refuses_malformed_metadata(text, why):
    with pytest.raises(AdapterFileError) as info:
        rules_in_metadata({"funclora": text}, "out/adapter_model.safetensors", "load_adapter")
    assert str(info.value) == (f"load_adapter: 'out/adapter_model.safetensors' has unreadable funclora metadata "
                               f"({why}). Save it again.")


# --- with_rules -------------------------------------------------------------------------------
def test_with_rules_adds_rules_to_a_copy():
    config = fl.LoraConfig(target_modules=["0"])
    out = with_rules(config, [_entry(Scale, ScaleRule)], required=True, file="f", fn="load_adapter")
    assert out is not config and config._custom_modules == {}
    assert list(out._custom_modules) == [Scale] and type(out._custom_modules[Scale]) is ScaleRule
    assert out.target_modules == ["0"]
    # a type the config already serves is kept as it is; nothing added -> the same config back
    config.register_custom_module({Scale: LinearRule()})
    assert with_rules(config, [_entry(Scale, ScaleRule)], required=True, file="f", fn="fn") is config
    assert with_rules(config, [], required=True, file="f", fn="fn") is config


def _unresolvable_message(fn="load_adapter"):
    return (f"{fn}: 'ad/adapter_model.safetensors' was saved with the custom rule gone.mod:GoneRule for modules of "
            "type gone.mod:Gone, which cannot be re-created here (LookupError: module 'gone.mod' is not imported "
            "(funclora never imports code a file names)). Register it before loading: config = "
            "fl.LoraConfig.from_pretrained(path); config.register_custom_module({Gone: GoneRule()}); then pass "
            "config=config.")


def test_with_rules_required_raises():
    config = fl.LoraConfig(target_modules=["0"])
    with pytest.raises(UnsupportedModuleError) as info:
        with_rules(config, [_entry("gone.mod:Gone", "gone.mod:GoneRule")], required=True,
                   file="ad/adapter_model.safetensors", fn="load_adapter")
    assert str(info.value) == _unresolvable_message()


def test_with_rules_not_required_warns_and_keeps_what_it_can():
    config = fl.LoraConfig(target_modules=["0"])
    entries = [_entry("gone.mod:Gone", "gone.mod:GoneRule"), _entry(Scale, ScaleRule)]
    with pytest.warns(UserWarning) as record:
        out = with_rules(config, entries, required=False, file="ad/adapter_model.safetensors", fn="load_adapters")
    assert [str(w.message) for w in record] == [_unresolvable_message("load_adapters")]
    assert list(out._custom_modules) == [Scale]
    with pytest.warns(UserWarning):
        assert with_rules(config, entries[:1], required=False, file="ad/adapter_model.safetensors",
                          fn="fn") is config
