"""funclora/core/default_targets.py: the default ``target_modules`` table equals PEFT's mapping."""

import pytest
import torch

from funclora.core.default_targets import DEFAULT_TARGETS, default_targets


def _peft_mapping():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


def _normalise(targets):
    return targets if isinstance(targets, str) else sorted(targets)


def test_table_covers_every_family_of_peft_with_the_same_targets():
    peft_table = _peft_mapping()
    assert sorted(DEFAULT_TARGETS) == sorted(peft_table)
    for model_type, targets in peft_table.items():
        assert _normalise(DEFAULT_TARGETS[model_type]) == _normalise(targets), model_type


def test_table_entries_are_lists_or_regex_strings():
    for model_type, targets in DEFAULT_TARGETS.items():
        assert isinstance(targets, (list, str)), model_type
        if isinstance(targets, list):
            assert targets and all(isinstance(t, str) and t for t in targets), model_type


class _Config:
    def __init__(self, model_type):
        self.model_type = model_type


def _with_type(model_type):
    model = torch.nn.Linear(2, 2)
    model.config = _Config(model_type)
    return model


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "t5", "bert", "gemma4"])
def test_lookup_by_config_model_type(model_type):
    got = default_targets(_with_type(model_type))
    assert _normalise(got) == _normalise(_peft_mapping()[model_type])


def test_lookup_returns_a_copy_the_caller_may_change():
    got = default_targets(_with_type("llama"))
    got.append("o_proj")
    assert DEFAULT_TARGETS["llama"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), _with_type("phi3"), _with_type(None)])
def test_unknown_or_missing_model_type_gives_none(model):
    assert default_targets(model) is None
