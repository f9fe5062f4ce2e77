"""LoraConfig: PEFT's fields and defaults, validation, JSON round trip."""

import dataclasses
import re

import peft
import pytest
import torch
import torch.nn as nn

import funclora as fl


def test_fields_and_defaults_equal_peft():
    ours = {f.name: f for f in dataclasses.fields(fl.LoraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    assert set(ours) == set(theirs)
    mine, ref = fl.LoraConfig(), peft.LoraConfig()
    for name in ("r", "lora_alpha", "lora_dropout", "bias", "init_lora_weights", "use_rslora",
                 "fan_in_fan_out", "target_modules", "modules_to_save", "rank_pattern", "alpha_pattern",
                 "layers_to_transform", "layers_pattern", "target_parameters", "exclude_modules"):
        assert getattr(mine, name) == getattr(ref, name), name


@pytest.mark.parametrize("field,value", [
    ("lora_bias", True), ("layer_replication", [[0, 1]]),
    ("loftq_config", {"loftq_bits": 4}), ("trainable_token_indices", [1, 2]),
    ("ensure_weight_tying", True), ("use_qalora", True),
])
def test_unimplemented_field_with_non_default_value_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        fl.LoraConfig(target_modules=["a"], **{field: value})


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4", "loftq", "eva", "corda"])
def test_peft_inits_we_do_not_implement_are_named(init):
    with pytest.raises(ValueError, match=f"init_lora_weights={init!r}"):
        fl.LoraConfig(init_lora_weights=init)


def test_unknown_init_has_peft_message():
    with pytest.raises(ValueError, match="Unknown initialization init_lora_weights='bogus'"):
        fl.LoraConfig(init_lora_weights="bogus")


@pytest.mark.parametrize("kwargs,message", [
    ({"target_modules": "fc", "layers_to_transform": [0]},
     "`layers_to_transform` cannot be used when `target_modules` is a str."),
    ({"target_modules": "fc", "layers_pattern": "h"}, "`layers_pattern` cannot be used when `target_modules` is a str."),
    ({"target_modules": ["fc"], "layers_pattern": "h"},
     "When `layers_pattern` is specified, `layers_to_transform` must also be specified."),
    ({"r": 0}, "`r` must be a positive int"),
    ({"bias": "some"}, "`bias` must be"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"target_parameters": ["w"], "lora_dropout": 0.1}, "target_parameters"),
    ({"rank_pattern": {"fc": 0}}, "rank_pattern"),
    # values that were accepted and then did something silently wrong, or failed deep inside torch
    ({"lora_alpha": float("nan")}, "`lora_alpha` must be a finite number, got nan"),
    ({"lora_alpha": float("inf")}, "`lora_alpha` must be a finite number, got inf"),
    ({"use_rslora": "false"}, "`use_rslora` must be True or False, got 'false'"),
    ({"fan_in_fan_out": 1}, "`fan_in_fan_out` must be True or False"),
    ({"task_type": "SEQ_CLASS"}, "Invalid task type: 'SEQ_CLASS'. Must be one of the following task types: SEQ_CLS"),
    ({"lora_dropout": "0.1"}, "`lora_dropout` must be a number in [0, 1), got '0.1'"),
    ({"lora_dropout": None}, "`lora_dropout` must be a number"),
    ({"rank_pattern": {"q_proj": True}}, "rank_pattern['q_proj'] must be a positive int, got True"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern['q_proj'] must be a finite number"),
    ({"layers_to_transform": "1"}, "`layers_to_transform` must be a layer index"),
    ({"layers_to_transform": [0, -1]}, "`layers_to_transform` must be a layer index"),
    ({"target_modules": "["}, "`target_modules` entry '[' is not a valid regular expression"),
    ({"target_modules": ["q"], "exclude_modules": "("}, "`exclude_modules` entry '(' is not a valid regular"),
    ({"modules_to_save": ["head["]}, "`modules_to_save` entry 'head[' is not a valid regular expression"),
    ({"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": "h("}, "`layers_pattern` entry"),
    ({"rank_pattern": {"q(": 4}}, "`rank_pattern` entry 'q(' is not a valid regular expression"),
    ({"alpha_pattern": {"*": 4}}, "`alpha_pattern` entry '*' is not a valid regular expression"),
    ({"init_lora_weights": "bogus"}, "takes True (kaiming-uniform A, zero B), 'gaussian' or False"),
    ({"revision": 3}, "`revision` must be a str or None, got 3"),
])
def test_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fl.LoraConfig(**kwargs)


def test_modules_to_save_as_one_string_is_one_module_as_in_peft():
    """A string was iterated letter by letter: the head was neither trained nor saved."""
    config = fl.LoraConfig(target_modules=["0"], modules_to_save="head")
    assert config.modules_to_save == ["head"]
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.add_module("head", torch.nn.Linear(4, 2))
    assert fl.LoRA(model, config).shapes()["head"] == {"weight": (2, 4), "bias": (2,)}


def test_a_bad_field_read_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"peft_type": "LORA", "r": 4, "target_modules": "[", "lora_alpha": 8}')
    with pytest.raises(ValueError, match=r"`target_modules` entry '\[' is not a valid regular.*adapter_config\.json"):
        fl.LoraConfig.from_pretrained(str(tmp_path))


def test_target_parameters_must_be_a_list():
    with pytest.raises(TypeError, match="`target_parameters` must be a list of strings or None."):
        fl.LoraConfig(target_parameters="lstm.weight_ih_l0")


def test_json_round_trip_and_peft_reads_it():
    config = fl.LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v"], modules_to_save=["head"],
                           rank_pattern={"q": 2}, use_rslora=True)
    again = fl.LoraConfig.from_dict(config.to_dict())
    assert again == config
    ref = peft.LoraConfig(**{k: v for k, v in config.to_dict().items() if k != "peft_type"})
    assert (ref.r, ref.lora_alpha, ref.use_rslora, ref.rank_pattern) == (4, 16, True, {"q": 2})
    assert config.to_json_string().startswith("{\n  ")


def test_from_dict_warns_once_about_unknown_keys_and_refuses_other_methods():
    with pytest.warns(UserWarning, match="funclora_extra"):
        config = fl.LoraConfig.from_dict({"peft_type": "LORA", "r": 2, "funclora_extra": 1})
    assert config.r == 2
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        fl.LoraConfig.from_dict({"peft_type": "IA3"})


def test_register_custom_module_accepts_rule_class_and_instance_and_alias():
    class MyRule(fl.Rule):
        pass

    config = fl.LoraConfig(target_modules=["lstm"])
    config._register_custom_module({nn.LSTM: MyRule})
    config.register_custom_module({nn.GRU: MyRule()})
    assert isinstance(config._custom_modules[nn.LSTM], MyRule)
    assert isinstance(config._custom_modules[nn.GRU], MyRule)


def test_register_custom_module_rejects_peft_layer_classes_with_a_fix():
    class NotARule(nn.Module):
        pass

    with pytest.raises(TypeError, match="must be a funclora.Rule"):
        fl.LoraConfig()._register_custom_module({nn.LSTM: NotARule})
