"""Targeting: PEFT's matching rules, checked name for name against PEFT itself."""

import copy
import warnings

import peft
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import funclora as fl


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.v = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 4)
        self.xfc = nn.Linear(4, 4)

    def forward(self, x):
        return self.xfc(self.fc(self.q(x) + self.v(x)))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([Block() for _ in range(3)])

    def forward(self, x):
        for b in self.h:
            x = b(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = Encoder()
        self.layers = nn.ModuleList([Block() for _ in range(3)])
        self.q = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.enc(x)
        for b in self.layers:
            x = b(x)
        return self.head(self.q(x))


def peft_targets(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).targeted_module_names


def ours(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fl.LoRA(model, fl.LoraConfig(**kwargs)).targeted_module_names


CASES = [
    dict(target_modules=["q"]),
    dict(target_modules=["q", "v"]),
    dict(target_modules=["fc"]),
    dict(target_modules=["h.0.q", "head"]),
    dict(target_modules=r".*\.q"),
    dict(target_modules="head"),
    dict(target_modules=r"enc\.h\.\d\.(q|v)"),
    dict(target_modules="ALL-LINEAR"),
    dict(target_modules="all-linear", exclude_modules=["fc"]),
    dict(target_modules=["q", "v"], exclude_modules=r".*layers.*"),
    dict(target_modules=["q", "v"], layers_to_transform=[0, 2]),
    dict(target_modules=["q"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q"], layers_to_transform=[1], layers_pattern=["h", "layers"]),
    dict(target_modules=["q", "fc"], modules_to_save=["enc"]),
    dict(target_modules=["q", "head"], modules_to_save=["head"]),
]


@pytest.mark.parametrize("kwargs", CASES, ids=[str(c) for c in CASES])
def test_targeted_names_equal_peft(kwargs):
    model = Net()
    assert ours(model, **kwargs) == peft_targets(model, **kwargs)


@settings(max_examples=30, deadline=None)
@given(
    targets=st.lists(st.sampled_from(["q", "v", "fc", "xfc", "head", "h.1.v", "0.fc", "layers.2.q"]),
                     min_size=1, max_size=4, unique=True),
    exclude=st.sampled_from([None, ["v"], ["h.0.q"], r".*\.fc"]),
    layers=st.sampled_from([None, [0], [1, 2]]),
)
def test_targeted_names_equal_peft_random(targets, exclude, layers):
    model = Net()
    kwargs = dict(target_modules=targets, exclude_modules=exclude, layers_to_transform=layers)
    try:
        expected = peft_targets(model, **kwargs)
    except ValueError:
        with pytest.raises(fl.TargetNotFoundError):
            ours(model, **kwargs)
        return
    assert ours(model, **kwargs) == expected


def test_plan_is_printable_and_ordered_like_named_modules():
    lora = fl.LoRA(Net(), fl.LoraConfig(target_modules=["q"], modules_to_save=["head"]))
    text = str(lora.plan)
    assert "enc.h.0.q  Linear  r=8" in text and "head  saved (weight, bias)" in text
    names = [n for n, _ in Net().named_modules()]
    assert lora.targeted_module_names == sorted(lora.targeted_module_names, key=names.index)


def test_rank_and_alpha_patterns_follow_peft():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4)}) for _ in range(3)])
    config = fl.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                           rank_pattern={"layers.0.q": 2, "v": 16, r"^layers\.1\..*": 3}, alpha_pattern={"q": 32})
    t = fl.LoRA(model, config).plan.targets
    assert (t["layers.0.q"].r, t["layers.0.q"].scaling) == (2, 16)
    assert (t["layers.1.q"].r, round(t["layers.1.q"].scaling, 2)) == (3, 10.67)
    assert (t["layers.2.q"].r, t["layers.2.q"].scaling) == (4, 8)
    assert all((t[f"layers.{i}.v"].r, t[f"layers.{i}.v"].scaling) == (16, 0.5) for i in range(3))


def test_rslora_scaling():
    t = fl.LoRA(nn.Sequential(nn.Linear(3, 3)), fl.LoraConfig(r=16, lora_alpha=8, use_rslora=True,
                                                             target_modules=["0"])).plan.targets["0"]
    assert t.scaling == 2.0


def test_unused_pattern_keys_warn():
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys did not match any targeted module.*\['zzz'\]"):
        fl.LoRA(Net(), fl.LoraConfig(target_modules=["q"], rank_pattern={"zzz": 2}))


def test_exclude_that_excludes_nothing_warns():
    with pytest.warns(UserWarning, match="no modules were excluded"):
        fl.LoRA(Net(), fl.LoraConfig(target_modules=["q"], exclude_modules=["zzz"]))


def test_not_found_names_the_patterns_and_closest_names():
    with pytest.raises(fl.TargetNotFoundError, match=r"\['qq'\].*Closest module names: .*'q'"):
        fl.LoRA(Net(), fl.LoraConfig(target_modules=["qq"]))
    with pytest.raises(fl.TargetNotFoundError, match="regex that must match a whole module path"):
        fl.LoRA(Net(), fl.LoraConfig(target_modules="q_proj"))


def test_all_matches_excluded():
    with pytest.raises(fl.TargetNotFoundError, match="No modules were targeted"):
        fl.LoRA(Net(), fl.LoraConfig(target_modules=["head"], modules_to_save=["head"]))


def test_empty_targets_without_parameters():
    with pytest.raises(fl.TargetNotFoundError, match="No `target_modules` passed but also no `target_parameters`"):
        fl.LoRA(Net(), fl.LoraConfig(target_modules=[]))


def test_custom_model_without_targets_needs_them():
    with pytest.raises(fl.TargetNotFoundError, match="specify `target_modules` or `target_parameters`"):
        fl.LoRA(Net(), fl.LoraConfig())


def test_unsupported_module_names_path_type_and_fixes():
    model = nn.Module()
    model.lstm = nn.LSTM(4, 8, batch_first=True)
    with pytest.raises(fl.UnsupportedModuleError) as info:
        fl.LoRA(model, fl.LoraConfig(target_modules=["lstm"]))
    message = str(info.value)
    for part in ("'lstm'", "torch.nn.modules.rnn.LSTM", "torch.nn.Linear", "register_rule",
                 "register_custom_module", "target_parameters=['lstm.<param>']"):
        assert part in message, part


def test_containers_matched_by_a_broad_pattern_are_unsupported():
    with pytest.raises(fl.UnsupportedModuleError, match="'enc'"):
        fl.LoRA(Net(), fl.LoraConfig(target_modules=r"enc.*"))


def test_modules_to_save_matches_dotted_suffix_not_plain_endswith():
    # PEFT's endswith also saves `xfc` for "fc" (PEFT issue #1917); funclora does not copy that.
    plan = fl.LoRA(Net(), fl.LoraConfig(target_modules=["q"], modules_to_save=["fc"])).plan
    assert all(p.endswith(".fc") for p in plan.saved) and len(plan.saved) == 6


def test_modules_to_save_that_matches_nothing_warns():
    with pytest.warns(UserWarning, match="'nothing' matched no module"):
        fl.LoRA(Net(), fl.LoraConfig(target_modules=["q"], modules_to_save=["nothing"]))


def test_user_rule_wins_over_builtin_and_mro_lookup():
    class MyLinear(nn.Linear):
        pass

    class Rule(fl.rules.LinearRule):
        pass

    model = nn.Sequential(MyLinear(3, 3), nn.Linear(3, 3))
    assert type(fl.LoRA(model, fl.LoraConfig(target_modules=["0"])).plan.targets["0"].rule) is fl.rules.LinearRule
    fl.register_rule(nn.Linear, Rule())
    try:
        plan = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "1"])).plan
        assert all(type(t.rule) is Rule for t in plan.targets.values())
    finally:
        fl.unregister_rule(nn.Linear)
    config = fl.LoraConfig(target_modules=["0", "1"])
    config.register_custom_module({MyLinear: Rule})
    plan = fl.LoRA(model, config).plan
    assert type(plan.targets["0"].rule) is Rule and type(plan.targets["1"].rule) is fl.rules.LinearRule


def test_target_parameters_match_and_key_by_parameter_path():
    model = nn.Module()
    model.lstm = nn.LSTM(4, 8, num_layers=2)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=[], target_parameters=["weight_ih_l0", "lstm.weight_hh_l1"]))
    assert lora.targeted_parameter_names == ["lstm.weight_ih_l0", "lstm.weight_hh_l1"]
    assert lora.shapes()["lstm.weight_ih_l0"] == {"lora_A": (8, 4), "lora_B": (32, 8)}


def test_target_parameters_that_match_nothing():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(fl.TargetNotFoundError, match="matched no parameter"):
        fl.LoRA(model, fl.LoraConfig(target_parameters=["nope"]))


def test_bias_modes():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 3, bias=False))
    plan = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], bias="all")).plan
    assert list(plan.biases) == ["0", "1"]
    plan = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], bias="lora_only")).plan
    assert list(plan.biases) == ["0"]
