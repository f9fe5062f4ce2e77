"""funclora.core._kinds: what a module is, and how a module path matches a target entry."""

import pytest
from torch import nn

from funclora.core._kinds import CONV1D, is_conv1d, is_linear, is_pretrained, join, name_match, type_name

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


class SubConv1D(Conv1D):
    """A subclass keeps the Conv1D kind (the check walks the MRO)."""


class Conv1DNamesake(nn.Module):
    """Same class name, another module: not transformers' Conv1D."""


Conv1DNamesake.__name__ = Conv1DNamesake.__qualname__ = "Conv1D"


class SubLinear(nn.Linear):
    pass


class PreTrainedModel(nn.Module):
    """Stands in for transformers' base class: ``is_pretrained`` looks at class names only."""


class TinyPretrained(PreTrainedModel):
    pass


# --- type_name --------------------------------------------------------------------------------
def test_type_name_is_module_and_qualname():
    assert type_name(nn.Linear) == "torch.nn.modules.linear.Linear"
    assert type_name(Conv1D) == CONV1D == "transformers.pytorch_utils.Conv1D"
    assert type_name(SubConv1D) == f"{__name__}.SubConv1D"

    class Local:
        pass

    assert type_name(Local) == f"{__name__}.test_type_name_is_module_and_qualname.<locals>.Local"


# --- is_conv1d --------------------------------------------------------------------------------
def test_is_conv1d_on_instances_and_classes():
    layer = Conv1D(6, 4)                      # nf=6 outputs, nx=4 inputs: weight (4, 6)
    assert tuple(layer.weight.shape) == (4, 6)
    assert is_conv1d(layer) is True
    assert is_conv1d(Conv1D) is True
    assert is_conv1d(SubConv1D(6, 4)) is True
    assert is_conv1d(SubConv1D) is True


def test_is_conv1d_refuses_other_layers_and_namesakes():
    assert is_conv1d(nn.Linear(2, 2)) is False
    assert is_conv1d(nn.Linear) is False
    assert is_conv1d(nn.Conv1d(2, 2, 1)) is False           # torch's Conv1d is a real convolution
    assert Conv1DNamesake.__name__ == "Conv1D"
    assert is_conv1d(Conv1DNamesake()) is False             # matched by qualified name, not short name
    assert is_conv1d(Conv1DNamesake) is False


# --- is_linear --------------------------------------------------------------------------------
def test_is_linear():
    assert is_linear(nn.Linear(2, 3)) is True
    assert is_linear(SubLinear(2, 3)) is True
    assert is_linear(Conv1D(3, 2)) is True
    assert is_linear(SubConv1D(3, 2)) is True
    assert is_linear(nn.Conv1d(2, 3, 1)) is False
    assert is_linear(nn.Embedding(4, 2)) is False
    assert is_linear(nn.Bilinear(2, 2, 3)) is False
    assert is_linear(nn.MultiheadAttention(4, 2)) is False  # its out_proj is linear, the module is not


# --- is_pretrained ----------------------------------------------------------------------------
def test_is_pretrained_by_class_name_in_mro():
    assert is_pretrained(TinyPretrained()) is True
    assert is_pretrained(PreTrainedModel()) is True
    assert is_pretrained(nn.Sequential(nn.Linear(2, 2))) is False
    assert is_pretrained(nn.Linear(2, 2)) is False


# --- name_match -------------------------------------------------------------------------------
@pytest.mark.parametrize("key, spec, want", [
    ("q_proj", ["q_proj"], "exact"),
    ("layers.0.q_proj", ["layers.0.q_proj"], "exact"),
    ("layers.0.q_proj", ["q_proj"], "suffix"),
    ("layers.0.q_proj", ["0.q_proj"], "suffix"),
    ("layers.0.q_proj", ["k_proj", "q_proj"], "suffix"),
    ("layers.0.xq_proj", ["q_proj"], None),          # a suffix must start after a dot
    ("layers.0.q_proj.lora", ["q_proj"], None),      # a prefix is no match
    ("layers.0.q_proj", [], None),
    ("layers.0.q_proj", ("q_proj",), "suffix"),      # any container of names
    ("layers.0.q_proj", {"layers.0.q_proj"}, "exact"),
])
def test_name_match_lists(key, spec, want):
    assert name_match(key, spec) == want


@pytest.mark.parametrize("key, spec, want", [
    ("layers.0.q_proj", r".*\.q_proj", "exact"),
    ("layers.0.q_proj", r"layers\.\d+\.(q|v)_proj", "exact"),
    ("layers.0.q_proj", "q_proj", None),             # a str is a regex over the whole path, not a name
    ("q_proj", "q_proj", "exact"),
    ("layers.0.q_proj", r"layers\.0", None),        # fullmatch: a matching prefix is not enough
    ("layers.10.q_proj", r".*\.1\.q_proj", None),
])
def test_name_match_regex(key, spec, want):
    assert name_match(key, spec) == want


def test_name_match_exact_wins_over_suffix():
    # the whole path is also listed: PEFT reports it as an exact match (layers_to_transform bypass)
    assert name_match("a.b", ["b", "a.b"]) == "exact"


# --- join -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix, name, want", [
    ("a.b", "c", "a.b.c"),
    ("", "c", "c"),
    ("a", "", "a"),
    ("", "", ""),
    ("layers.0", "q_proj", "layers.0.q_proj"),
])
def test_join(prefix, name, want):
    assert join(prefix, name) == want
