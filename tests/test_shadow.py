"""funclora.core.shadow: a call's own shallow view of the module tree (the model itself is never written)."""

import collections
import functools
import re

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, snapshot
from funclora.core.shadow import Shadower
from funclora.errors import AdapterMismatchError, UnsupportedModuleError


class Net(nn.Module):
    """Nested: root → enc (Sequential: fc, act, norm) and a separate head; enc.fc is what changes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.enc(x))


def _zeros_for(module: nn.Module, name: str) -> torch.Tensor:
    return torch.zeros_like(module.get_parameter(name))


# --- what a shadow is -------------------------------------------------------------------------
def test_only_the_changed_module_and_its_ancestors_are_new():
    model = Net().eval()
    w = torch.full((4, 3), 0.5)
    shadow = Shadower(model).build({"enc.0.weight": w})
    assert type(shadow) is Net and shadow is not model
    assert shadow.enc is not model.enc and shadow.enc[0] is not model.enc[0]
    assert shadow.enc[1] is model.enc[1] and shadow.enc[2] is model.enc[2] and shadow.head is model.head
    assert shadow.enc[0].weight is w
    assert shadow.enc[0].bias is model.enc[0].bias        # tensors not replaced are shared, not copied
    assert shadow.enc[0]._forward_hooks is model.enc[0]._forward_hooks
    assert shadow.enc[0].__dict__.keys() == model.enc[0].__dict__.keys()
    assert model.enc[0].weight is not w and model.enc[0].weight.ne(0.5).any()


def test_the_shadow_computes_with_the_given_tensors():
    model = Net().eval()
    x = torch.randn(5, 3)
    tensors = {"enc.0.weight": torch.randn(4, 3), "head.bias": torch.tensor([1.0, -1.0])}
    before = snapshot(model)
    out = Shadower(model).build(tensors)(x)
    params = dict(model.named_parameters()) | tensors
    want = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert_unchanged(before, model)
    assert not torch.equal(model(x), out)


def test_buffers_can_be_replaced_and_training_updates_the_given_copy():
    model = Net().eval()
    given = {"enc.2.running_mean": torch.zeros(4), "enc.2.running_var": torch.ones(4),
             "enc.2.num_batches_tracked": torch.tensor(0)}
    before = snapshot(model)
    shadow = Shadower(model).build(given, training=True)
    assert shadow.enc[2].running_mean is given["enc.2.running_mean"]
    shadow(torch.randn(8, 3) + 3)                          # BatchNorm updates its running stats in place
    assert given["enc.2.running_mean"].abs().sum() > 0     # the shadow's own buffers moved ...
    assert given["enc.2.num_batches_tracked"].item() == 1
    assert_unchanged(before, model)                        # ... the model's did not


def test_buffers_not_given_are_shared_not_copied():
    model = Net()
    shadow = Shadower(model).build({"enc.2.running_mean": torch.zeros(4)}, training=True)
    assert shadow.enc[2].num_batches_tracked is model.enc[2].num_batches_tracked
    assert shadow.enc[2].running_var is model.enc[2].running_var
    shadow(torch.randn(8, 3))
    assert model.enc[2].num_batches_tracked.item() == 1    # so the caller gives copies of what may change


def test_training_flag_is_forced_on_every_module_of_the_view_only():
    model = Net().eval()
    model.enc[1].train()                                   # a mixed model: flags restored from nowhere, never set
    before = snapshot(model)
    shadow = Shadower(model).build({}, training=True)
    assert all(m.training for m in shadow.modules())
    assert {id(m) for m in shadow.modules()}.isdisjoint(id(m) for m in model.modules())   # every module shadowed
    assert [m.training for m in model.modules()] == [False, False, False, True, False, False]
    off = Shadower(model).build({}, training=False)
    assert not any(m.training for m in off.modules())
    kept = Shadower(model).build({"head.bias": torch.zeros(2)})   # None: the model's own flags
    assert [m.training for m in kept.modules()] == [False, False, False, True, False, False]
    assert kept.enc is model.enc                           # and only what changes is shadowed
    assert_unchanged(before, model)


def test_a_build_with_nothing_to_replace_is_the_model_itself():
    model = Net().eval()
    x = torch.randn(2, 3)
    torch.testing.assert_close(Shadower(model).build({})(x), model(x))


def test_each_build_is_a_fresh_view():
    model = Net()
    shadower = Shadower(model)
    a = shadower.build({"head.weight": torch.zeros(2, 4)})
    b = shadower.build({"head.weight": torch.ones(2, 4)})
    assert a is not b and a.head is not b.head
    assert a.head.weight.sum() == 0 and b.head.weight.sum() == 8
    assert len(shadower._recipes) == 1                     # one recipe for one key set


def test_unknown_names_are_refused():
    model = Net()
    with pytest.raises(AdapterMismatchError) as info:
        Shadower(model).build({"enc.0.wieght": torch.zeros(4, 3)})
    assert str(info.value) == (
        "LoRA.apply: the params dict names 'enc.0.wieght', which is not a parameter or buffer of the model (Net); "
        "pass names as model.named_parameters() gives them.")


# --- forwards and views -----------------------------------------------------------------------
def test_forwards_are_bound_to_the_shadow():
    model = Net().eval()
    calls = []

    def doubled(self, x):
        calls.append(self)
        return 2 * nn.Linear.forward(self, x)

    shadow = Shadower(model).build({}, forwards={"head": doubled})
    x = torch.randn(2, 3)
    torch.testing.assert_close(shadow(x), 2 * model(x))
    assert calls == [shadow.head] and shadow.head is not model.head
    assert "forward" not in model.head.__dict__


def test_views_change_the_class_of_one_module():
    class Scaled(nn.Linear):
        def forward(self, x):
            return self._view_state * super().forward(x)

    model = Net().eval()
    shadow = Shadower(model).build({}, views={"head": (Scaled, 3.0)})
    assert type(shadow.head) is Scaled and type(model.head) is nn.Linear
    assert "_view_state" not in model.head.__dict__
    x = torch.randn(2, 3)
    torch.testing.assert_close(shadow(x), 3 * model(x))


# --- references outside _modules -------------------------------------------------------------
class Referring(nn.Module):
    """Reaches its layers through a plain attribute, a list, a dict, a bound method and a partial."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        object.__setattr__(self, "last", self.layers[-1])   # plain: nn.Module.__setattr__ would register a child
        self.order = [self.layers[0], self.layers[1]]
        self.by_name = {"first": self.layers[0]}
        self.run_last = self.layers[1].forward
        self.run_first = functools.partial(nn.Linear.forward, self.layers[0])

    def forward(self, x):
        return self.last(self.by_name["first"](x)) + self.run_last(x) + self.run_first(x) + self.order[1](x)


def test_plain_references_are_redirected_to_the_shadow():
    model = Referring()
    before = snapshot(model)
    w0, w1 = torch.eye(3), 2 * torch.eye(3)
    shadow = Shadower(model).build({"layers.0.weight": w0, "layers.1.weight": w1})
    assert "last" not in model._modules
    assert shadow.last is shadow.layers[1] and model.last is model.layers[1]
    assert shadow.order == [shadow.layers[0], shadow.layers[1]] and type(shadow.order) is list
    assert shadow.by_name["first"] is shadow.layers[0]
    assert shadow.run_last.__self__ is shadow.layers[1]
    assert shadow.run_first.args == (shadow.layers[0],) and shadow.run_first.func is nn.Linear.forward
    assert model.order[0] is model.layers[0] and model.run_last.__self__ is model.layers[1]
    x = torch.randn(4, 3)
    b0, b1 = model.layers[0].bias, model.layers[1].bias
    h = x @ w0.T + b0
    want = (h @ w1.T + b1) + (x @ w1.T + b1) + (x @ w0.T + b0) + (x @ w1.T + b1)
    torch.testing.assert_close(shadow(x), want)
    assert_unchanged(before, model)


def test_a_plain_attribute_rewired_after_the_recipe_was_cached_is_redirected():
    model = Referring()
    model.__dict__["probe"] = model.layers[1]              # a plain attribute, not a child in _modules
    shadower = Shadower(model)
    tensors = {"layers.0.weight": torch.eye(3), "layers.1.weight": torch.eye(3)}
    assert shadower.build(tensors).probe is not model.layers[1]   # recipe cached
    model.__dict__["probe"] = model.layers[0]              # rewired after
    shadow = shadower.build(tensors)
    assert shadow.probe is shadow.layers[0]


def test_a_module_shared_under_two_paths_has_one_shadow():
    model = nn.Module()
    shared = nn.Linear(2, 2)
    model.a = nn.Sequential(shared)
    model.b = nn.Sequential(nn.Identity(), shared)
    shadow = Shadower(model).build({"a.0.weight": torch.zeros(2, 2)})
    assert shadow.a[0] is shadow.b[1] and shadow.a[0] is not shared
    assert shadow.b[0] is model.b[0] and shadow.b is not model.b
    assert shadow.b[1].weight.sum() == 0 and shared.weight.abs().sum() > 0


# --- refusals ---------------------------------------------------------------------------------
def test_a_closure_holding_a_module_is_refused_when_the_shadower_is_made():
    model = Net()
    head = model.head
    model.enc.__dict__["project"] = lambda x: head(x)      # plain attribute, not a submodule
    with pytest.raises(UnsupportedModuleError) as info:
        Shadower(model)
    assert str(info.value) == (
        "LoRA: 'enc' (Sequential) holds a module of the model inside its attribute 'project' (a function). "
        "funclora runs each call on its own view of the module tree and cannot redirect such a reference, so "
        "that module would run with its own weights, without the adapter. Keep submodules as attributes, in "
        "lists, dicts, bound methods or partial arguments (not inside a closure, a set, a subclass of list / "
        "tuple / dict, or a nested container); for torch.compile, pass the uncompiled model and compile the LoRA call (torch.compile(lora)) instead.")


@pytest.mark.parametrize("value, kind", [
    (lambda m: [[m]], "list"),
    (lambda m: {"x": (m,)}, "dict"),
    (lambda m: functools.partial(lambda y: m(y)), "partial"),
])
def test_references_no_shadow_can_redirect_are_refused(value, kind):
    model = Net()
    model.__dict__["hidden"] = value(model.head)
    with pytest.raises(UnsupportedModuleError, match=re.escape(
            f"LoRA: '<root>' (Net) holds a module of the model inside its attribute 'hidden' (a {kind}).")):
        Shadower(model)


def test_closures_without_modules_and_unrelated_modules_are_fine():
    model = Net()
    scale = 2.0
    model.__dict__["post"] = lambda y: scale * y
    model.__dict__["outsider"] = [[nn.Linear(1, 1)]]       # not a module of this model
    Shadower(model).build({"head.weight": torch.zeros(2, 4)})


class _Modules(list):
    pass


_Pair = collections.namedtuple("_Pair", "layer scale")


@pytest.mark.parametrize("make", [
    lambda m: {m}, lambda m: frozenset([m]), lambda m: collections.OrderedDict(layer=m), lambda m: _Pair(m, 1.0),
    lambda m: _Modules([m]),
], ids=["set", "frozenset", "OrderedDict", "namedtuple", "list-subclass"])
def test_modules_in_other_containers_are_redirected_or_refused(make):
    model = Net()
    object.__setattr__(model, "ref", make(model.head))
    try:
        shadow = Shadower(model).build({"head.weight": torch.zeros(2, 4)})
    except UnsupportedModuleError:
        return                                             # refused when the shadower is made: fine
    held = list(shadow.ref.values()) if isinstance(shadow.ref, dict) else list(shadow.ref)
    assert held[0] is shadow.head                          # or redirected to the shadow
