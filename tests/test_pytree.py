"""funclora.core.pytree: stack / select / unstack of adapters, and the structure check behind them."""

import re
from collections import OrderedDict
from types import MappingProxyType

import pytest
import torch

from funclora.core.pytree import checked_leaves, select, stack, unstack


def _adapter(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"fc": {"lora_A": torch.randn(2, 4, generator=g), "lora_B": torch.randn(3, 2, generator=g)},
            "emb": {"lora_embedding_A": torch.randn(2, 5, generator=g), "bias": torch.randn(3, generator=g)}}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], b[p][k]) for k in a[p]) for p in a)


# --- round trips ------------------------------------------------------------------------------
def test_stack_adds_a_leading_axis_with_each_adapter_in_order():
    adapters = [_adapter(s) for s in range(3)]
    stacked = stack(adapters)
    assert {p: {k: tuple(t.shape) for k, t in leaves.items()} for p, leaves in stacked.items()} == {
        "fc": {"lora_A": (3, 2, 4), "lora_B": (3, 3, 2)},
        "emb": {"lora_embedding_A": (3, 2, 5), "bias": (3, 3)}}
    for i, adapter in enumerate(adapters):
        for path, leaves in adapter.items():
            for leaf, t in leaves.items():
                assert torch.equal(stacked[path][leaf][i], t)


def test_select_and_unstack_invert_stack():
    adapters = [_adapter(s) for s in range(4)]
    stacked = stack(adapters)
    back = unstack(stacked)
    assert len(back) == 4
    assert all(_equal(a, b) for a, b in zip(adapters, back))
    assert _equal(select(stacked, 2), adapters[2])
    assert _equal(select(stacked, -1), adapters[3])        # negative indices as in Python
    assert _equal(select(stacked, -4), adapters[0])
    assert _equal(stack(unstack(stacked)), stacked)


def test_select_gives_views_of_the_stack():
    stacked = stack([_adapter(0), _adapter(1)])
    one = select(stacked, 1)
    assert one["fc"]["lora_A"].data_ptr() == stacked["fc"]["lora_A"][1].data_ptr()
    assert one["fc"]["lora_A"]._base is stacked["fc"]["lora_A"]


def test_stack_of_one_and_key_order_of_the_first_adapter():
    a = _adapter(0)
    b = {"emb": dict(reversed(list(a["emb"].items()))), "fc": a["fc"]}   # same structure, other order
    stacked = stack([a, b])
    assert list(stacked) == ["fc", "emb"]
    assert list(stacked["emb"]) == ["lora_embedding_A", "bias"]
    assert tuple(stack([a])["fc"]["lora_A"].shape) == (1, 2, 4)


def test_stack_accepts_any_mappings_and_a_tuple():
    a = _adapter(0)
    frozen = MappingProxyType({p: MappingProxyType(leaves) for p, leaves in a.items()})
    stacked = stack((a, frozen))
    assert type(stacked) is dict and type(stacked["fc"]) is dict
    assert torch.equal(stacked["fc"]["lora_B"][1], a["fc"]["lora_B"])


def test_stack_keeps_gradients_flowing_to_each_adapter():
    a, b = _adapter(0), _adapter(1)
    a["fc"]["lora_A"].requires_grad_(True)
    stacked = stack([a, b])
    (stacked["fc"]["lora_A"][0] * 2).sum().backward()
    assert torch.equal(a["fc"]["lora_A"].grad, torch.full((2, 4), 2.0))


# --- errors -----------------------------------------------------------------------------------
def test_stack_wants_a_list():
    with pytest.raises(TypeError, match=re.escape(
            "stack: pass a list of adapters ([a_0, a_1, ...]), got a dict (one adapter? wrap it: "
            "fl.stack([adapter])).")):
        stack(_adapter(0))
    with pytest.raises(TypeError, match=re.escape("stack: pass a list of adapters ([a_0, a_1, ...]), got a "
                                                  "generator.")):
        stack(a for a in [_adapter(0)])
    with pytest.raises(ValueError, match=re.escape("stack: got no adapters; pass a non-empty list.")):
        stack([])


def test_stack_names_missing_and_unexpected_paths():
    a, b = _adapter(0), _adapter(1)
    b["head"] = b.pop("emb")
    with pytest.raises(ValueError, match=re.escape(
            "stack: adapter 1 has other module paths than adapter 0: missing ['emb'], unexpected ['head']; "
            "only adapters of one config stack.")):
        stack([a, b])


def test_stack_names_other_leaves():
    a, b, c = _adapter(0), _adapter(1), _adapter(2)
    del c["fc"]["lora_B"]
    with pytest.raises(ValueError, match=re.escape(
            "stack: adapter 2['fc'] has leaves ['lora_A'], adapter 0 has ['lora_A', 'lora_B']; "
            "only adapters of one config stack.")):
        stack([a, b, c])


def test_stack_names_a_shape_mismatch_with_both_shapes():
    a, b = _adapter(0), _adapter(1)
    b["fc"]["lora_A"] = torch.zeros(3, 4)           # trained with r=3
    with pytest.raises(ValueError, match=re.escape(
            "stack: adapter 1['fc']['lora_A'] has shape (3, 4), adapter 0 has (2, 4); only adapters of one "
            "config stack.")):
        stack([a, b])


def test_stack_refuses_non_tensors_and_non_dicts():
    a, b = _adapter(0), _adapter(1)
    b["fc"]["lora_A"] = b["fc"]["lora_A"].tolist()
    with pytest.raises(TypeError, match=re.escape(
            "stack: adapter 1['fc']['lora_A'] is a list, expected a torch.Tensor.")):
        stack([a, b])
    with pytest.raises(TypeError, match=re.escape(
            "stack: adapter 0['fc'] must be a dict {leaf: Tensor}, got tuple.")):
        stack([{"fc": (torch.zeros(1),)}])
    with pytest.raises(TypeError, match=re.escape(
            "stack: adapter 1 must be a dict {path: {leaf: Tensor}}, got NoneType.")):
        stack([a, None])


def test_select_refuses_an_out_of_range_index():
    stacked = stack([_adapter(0), _adapter(1)])
    with pytest.raises(IndexError, match=re.escape("select: index 2 is out of range for a stack of 2 adapters.")):
        select(stacked, 2)
    with pytest.raises(IndexError, match=re.escape("select: index -3 is out of range for a stack of 2 adapters.")):
        select(stacked, -3)


def test_select_and_unstack_refuse_an_unstacked_adapter():
    # leaves of an unstacked adapter have different leading sizes: say it is not stacked
    with pytest.raises(ValueError, match=re.escape(
            "select: the leaves have leading sizes [2, 3], not one shared stack size N: this adapter is "
            "not stacked. fl.stack([a_0, a_1, ...]) makes a stacked adapter; an unstacked one needs no select.")):
        select(_adapter(0), 0)
    scalar = {"fc": {"lora_A": torch.zeros(2, 4), "s": torch.tensor(1.0)}}
    with pytest.raises(ValueError, match=re.escape("unstack: the leaves have leading sizes [2, None]")):
        unstack(scalar)
    with pytest.raises(ValueError, match=re.escape("unstack: the leaves have leading sizes [], not one shared")):
        unstack({})
    with pytest.raises(TypeError, match=re.escape(
            "unstack: the stacked adapter['fc']['lora_A'] is a int, expected a torch.Tensor.")):
        unstack({"fc": {"lora_A": 3}})


# --- checked_leaves ---------------------------------------------------------------------------
def test_checked_leaves_copies_into_plain_dicts():
    inner = OrderedDict(lora_A=torch.zeros(2, 4))
    adapter = MappingProxyType({"fc": inner})
    out = checked_leaves(adapter, "fn", "the adapter")
    assert type(out) is dict and type(out["fc"]) is dict
    assert out["fc"] is not inner and out["fc"]["lora_A"] is inner["lora_A"]   # tensors are not copied
    assert checked_leaves({}, "fn", "x") == {}


@pytest.mark.parametrize("adapter, error", [
    ([1], "fn: the adapter must be a dict {path: {leaf: Tensor}}, got list."),
    ({"fc": torch.zeros(2)}, "fn: the adapter['fc'] must be a dict {leaf: Tensor}, got Tensor."),
    ({"fc": {"lora_A": 1.5}}, "fn: the adapter['fc']['lora_A'] is a float, expected a torch.Tensor."),
    ({"fc": {"lora_A": None}}, "fn: the adapter['fc']['lora_A'] is a NoneType, expected a torch.Tensor."),
])
def test_checked_leaves_names_what_is_wrong(adapter, error):
    with pytest.raises(TypeError) as info:
        checked_leaves(adapter, "fn", "the adapter")
    assert str(info.value) == error
