"""LoRA: init, forward, merge/unmerge/delta, counting, errors — and that the model is never touched."""

import contextlib
import copy
import io
import types
import warnings

import peft
import pytest
import torch
import torch.nn as nn

import funclora as fl
from funclora.core.forward import overlay as core_overlay
from conftest import assert_unchanged, random_adapter, snapshot


class Mixed(nn.Module):
    """One of every built-in layer type, plus BatchNorm (buffers that change in training)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.bn(self.conv(h.transpose(1, 2))).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.fc(h))).mean(1)


CONFIG = dict(target_modules=["emb", "conv", "attn", "fc"], modules_to_save=["head"], r=4)
IDS = torch.randint(0, 30, (2, 5))


def test_adapter_leaves_have_peft_names_and_shapes():
    lora = fl.LoRA(Mixed(), fl.LoraConfig(**CONFIG))
    assert lora.shapes() == {
        "emb": {"lora_embedding_A": (4, 30), "lora_embedding_B": (8, 4)},
        "conv": {"lora_A": (4, 8, 3), "lora_B": (8, 4, 1)},
        "attn": {"lora_A": (4, 8), "lora_B": (24, 4), "out_proj.lora_A": (4, 8), "out_proj.lora_B": (8, 4)},
        "fc": {"lora_A": (4, 8), "lora_B": (8, 4)},
        "head": {"weight": (3, 8), "bias": (3,)},
    }
    adapter = lora.init()
    assert {p: {k: tuple(v.shape) for k, v in d.items()} for p, d in adapter.items()} == lora.shapes()


def test_init_follows_peft():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.Conv2d(16, 32, 3), nn.Embedding(50, 8))
    g = torch.Generator().manual_seed(0)
    a = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "1", "2"], r=16)).init(generator=g)
    assert 0.049 < a["0"]["lora_A"].abs().max() <= 0.05 and not a["0"]["lora_B"].any()
    assert 0.08 < a["1"]["lora_A"].abs().max() <= 1 / 144 ** 0.5 and not a["1"]["lora_B"].any()
    assert not a["2"]["lora_embedding_A"].any() and 0.8 < a["2"]["lora_embedding_B"].std() < 1.2
    gauss = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=16, init_lora_weights="gaussian")).init(generator=g)
    assert abs(gauss["0"]["lora_A"].std() - 1 / 16) < 0.005 and not gauss["0"]["lora_B"].any()
    noinit = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], r=16, init_lora_weights=False)).init(generator=g)
    assert 0.2 < noinit["0"]["lora_B"].abs().max() <= 0.25 and noinit["2"]["lora_embedding_A"].std() > 0.5


def test_init_is_seeded_by_the_generator():
    lora = fl.LoRA(Mixed(), fl.LoraConfig(**CONFIG))
    a1 = lora.init(generator=torch.Generator().manual_seed(3))
    a2 = lora.init(generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a1[p][k], a2[p][k]) for p in a1 for k in a1[p])


@pytest.mark.parametrize("training", [False, True])
def test_no_call_changes_the_model(training):
    model = Mixed().train(training)
    before = snapshot(model)
    lora = fl.LoRA(model, fl.LoraConfig(**CONFIG))
    adapter = random_adapter(lora)
    lora(adapter, IDS).sum()
    grads = torch.func.grad(lambda a: lora(a, IDS).sum())(adapter)
    merged = lora.merge(adapter)
    lora.apply(merged, {p: {k: torch.zeros_like(v) for k, v in d.items()} for p, d in adapter.items()}, IDS)
    lora.unmerge(merged, adapter)
    lora.delta(adapter)
    with contextlib.redirect_stdout(io.StringIO()):
        lora.print_trainable_parameters(adapter)
    peft_model = fl.get_peft_model(model, fl.LoraConfig(**CONFIG))
    peft_model.train(not training)
    peft_model(IDS).sum().backward()
    peft_model.merge_and_unload()
    assert grads["fc"]["lora_A"].shape == (4, 8)
    assert_unchanged(before, model)


def test_failing_calls_change_nothing_either():
    model = Mixed()
    before = snapshot(model)
    lora = fl.LoRA(model, fl.LoraConfig(**CONFIG))
    adapter = random_adapter(lora)
    with pytest.raises(IndexError):
        lora(adapter, torch.tensor([[99]]))        # fails inside the model's forward
    with pytest.raises(fl.AdapterMismatchError):
        lora({}, IDS)
    with pytest.raises(fl.UnsupportedModuleError):
        fl.LoRA(model, fl.LoraConfig(target_modules=["bn"]))
    peft_model = fl.get_peft_model(model, fl.LoraConfig(**CONFIG))
    peft_model.train()
    with pytest.raises(IndexError):
        peft_model(torch.tensor([[99]]))
    assert_unchanged(before, model)


def test_adapter_mismatch_errors_name_key_expected_and_found():
    lora = fl.LoRA(Mixed(), fl.LoraConfig(**CONFIG))
    adapter = lora.init()
    with pytest.raises(fl.AdapterMismatchError, match=r"missing \['fc'\], unexpected \['zz'\]"):
        lora({**{k: v for k, v in adapter.items() if k != "fc"}, "zz": {}}, IDS)
    bad = {**adapter, "fc": {"lora_A": torch.zeros(2, 8), "lora_B": torch.zeros(8, 2)}}
    with pytest.raises(fl.AdapterMismatchError, match=r"adapter\['fc'\]\['lora_A'\] has shape \(2, 8\) but the "
                                                       r"model's fc needs \(4, 8\).*another r"):
        lora(bad, IDS)
    with pytest.raises(fl.AdapterMismatchError, match=r"leaves \['lora_A'\], expected \['lora_A', 'lora_B'\]"):
        lora({**adapter, "fc": {"lora_A": adapter["fc"]["lora_A"]}}, IDS)
    with pytest.raises(fl.AdapterMismatchError, match="vmap over a stacked adapter"):
        lora(fl.stack([adapter, adapter]), IDS)


def test_merge_unmerge_delta():
    model = Mixed().eval()
    lora = fl.LoRA(model, fl.LoraConfig(**CONFIG))
    adapter = random_adapter(lora)
    merged = lora.merge(adapter)
    assert set(merged) == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(torch.func.functional_call(model, merged, (IDS,)), lora(adapter, IDS))
    assert torch.equal(merged["head.weight"], adapter["head"]["weight"])
    deltas = lora.delta(adapter)
    assert set(deltas) == {"emb.weight", "conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"}
    params = lora.unmerge(merged, adapter)
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p, atol=1e-6, rtol=0)


def test_grouped_conv_forward_works_but_merge_refuses_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=4))
    adapter = random_adapter(lora)
    assert lora(adapter, torch.randn(1, 4, 5, 5)).shape == (1, 8, 3, 3)
    with pytest.raises(NotImplementedError, match=r"'0'.*groups=2.*not a grouped kernel"):
        lora.merge(adapter)
    with pytest.raises(fl.UnsupportedModuleError, match="rank must be divisible by groups"):
        fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=3))


def _peft_counts(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).get_nb_trainable_parameters()


@pytest.mark.parametrize("kwargs", [
    CONFIG,
    dict(target_modules=["fc", "conv"], bias="all"),
    dict(target_modules=["fc", "conv"], bias="lora_only", modules_to_save=["emb"]),
    dict(target_modules=["fc"], rank_pattern={"fc": 2}, modules_to_save=["bn"]),
])
def test_parameter_counts_equal_peft(kwargs):
    model = Mixed()
    lora = fl.LoRA(model, fl.LoraConfig(**kwargs))
    assert lora.num_parameters() == _peft_counts(model, **kwargs)
    assert fl.get_peft_model(model, fl.LoraConfig(**kwargs)).get_nb_trainable_parameters() == lora.num_parameters()


def test_bias_all_trains_every_bias_and_merge_uses_them():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], bias="all"))
    adapter = random_adapter(lora)
    assert set(adapter["0"]) == {"lora_A", "lora_B", "bias"} and set(adapter["1"]) == {"bias"}
    x = torch.randn(5, 3)
    grads = torch.func.grad(lambda a: lora(a, x).square().sum())(adapter)
    assert grads["2"]["bias"].abs().sum() > 0
    torch.testing.assert_close(lora(adapter, x), torch.func.functional_call(model, lora.merge(adapter), (x,)))


def test_training_mode_buffers_are_not_updated_in_the_users_model():
    model = Mixed().train()
    lora = fl.LoRA(model, fl.LoraConfig(**CONFIG))
    before = model.bn.running_mean.clone()
    lora(random_adapter(lora), IDS)
    assert torch.equal(model.bn.running_mean, before)


def test_print_trainable_parameters_format(capsys):
    lora = fl.LoRA(nn.Sequential(nn.Linear(20, 30)), fl.LoraConfig(target_modules=["0"]))
    lora.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 400 || all params: 1,030 || trainable%: 38.8350\n"


def test_backward_reaches_only_the_adapter_but_apply_can_differentiate_base_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"]))
    adapter = {p: {k: v.requires_grad_() for k, v in d.items()} for p, d in random_adapter(lora).items()}
    lora(adapter, torch.randn(3, 4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert adapter["0"]["lora_B"].grad is not None
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    lora.apply(params, adapter, torch.randn(3, 4)).sum().backward()
    assert params["0.weight"].grad is not None and params["2.weight"].grad is not None


class Shared(nn.Module):
    """One Linear reachable under two paths (``a`` and ``b``), used twice per forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))))


@pytest.mark.parametrize("grad", [False, True])
def test_a_module_shared_under_two_paths_gets_its_lora_at_both_uses(grad):
    """``b`` is ``a``: the eager forward (which sets tensors in the owners' dicts itself) must
    not let the twin name ``b.weight`` overwrite the overlay; merge must agree, and every
    original tensor object must be back afterwards, also after a failing call."""
    model = Shared()
    before = snapshot(model)
    originals = dict(model.named_parameters(remove_duplicate=False))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["a"], r=2))
    adapter, x = random_adapter(lora, scale=0.5), torch.randn(3, 6)
    overlay = core_overlay(lora.bound, adapter, None)
    with torch.set_grad_enabled(grad):
        got = lora(adapter, x)
        by_torch = torch.func.functional_call(model, overlay, (x,), tie_weights=False, strict=False)
        merged = torch.func.functional_call(model, lora.merge(adapter), (x,), tie_weights=False)
        full = lora.merge(adapter, dict(model.named_parameters(remove_duplicate=False)))
        merged_full = torch.func.functional_call(model, full, (x,), tie_weights=False)
        applied = lora.apply(originals, adapter, x)
    plain = model(x)
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, by_torch, rtol=0, atol=0)
    torch.testing.assert_close(applied, got, rtol=0, atol=0)
    for m in (merged, merged_full):
        torch.testing.assert_close(m, got, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        lora(adapter, torch.randn(3, 5))        # fails inside the swapped forward
    assert dict(model.named_parameters(remove_duplicate=False)).items() == originals.items()
    assert_unchanged(before, model)


def test_a_parametrized_weight_is_refused_with_the_fix():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
    with pytest.raises(fl.UnsupportedModuleError, match=r"'0' has a parametrized 'weight'.*remove_parametrizations"):
        fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["1"], r=2))      # the rest of the model still works
    adapter, x = random_adapter(lora), torch.randn(3, 4)
    torch.testing.assert_close(lora(adapter, x), torch.func.functional_call(model, lora.merge(adapter), (x,)))


class LinearWithOwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _minus_one_linear(module, x):
    return torch.nn.functional.linear(x, module.weight) - 1


class ReadsWeightDirectly(nn.Module):
    """``fc`` is called as a module; ``head.weight`` is read directly (never through ``head``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.own = LinearWithOwnForward(5, 5)
        self.custom = nn.Linear(5, 5, bias=False)
        self.custom.forward = types.MethodType(_minus_one_linear, self.custom)  # an instance forward
        self.head = nn.Linear(5, 3)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        h = self.custom(self.own(torch.relu(self.fc(x))))
        return torch.nn.functional.linear(self.drop(h), self.head.weight, self.head.bias)


@pytest.mark.parametrize("training", [False, True])
def test_eager_linear_shortcut_equals_the_lazy_weight_path(training):
    """Eager calls run targeted nn.Linears as lazy.linear_view (no lazy weight, no __torch_function__
    round trip). It must give bit-identical outputs and gradients to torch's functional_call with the
    same lazy weights, leave no attribute behind (also when the call fails), keep a Linear
    subclass's own forward and an instance forward, and run the module's hooks."""
    torch.manual_seed(0)
    model = ReadsWeightDirectly().train(training)
    calls = []
    model.fc.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model.fc.register_forward_hook(lambda m, args, out: calls.append("post"))
    before = snapshot(model)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["fc", "own", "custom", "head"], r=2, lora_dropout=0.3,
                                        bias="lora_only"))
    assert list(lora.bound.linear_views) == ["fc", "custom", "head"]
    adapter = {p: {k: v.requires_grad_() for k, v in leaves.items()} for p, leaves in random_adapter(lora, 0.5).items()}
    x = torch.randn(4, 5)

    def by_torch(a):
        overlay = core_overlay(lora.bound, a, None, detach=True)
        return torch.func.functional_call(model, overlay, (x,), tie_weights=False, strict=False)

    torch.manual_seed(1)
    got = lora(adapter, x)
    g_got = torch.autograd.grad(got.square().sum(), [v for d in adapter.values() for v in d.values()])
    assert calls == ["pre", "post"]
    torch.manual_seed(1)
    want = by_torch(adapter)
    g_want = torch.autograd.grad(want.square().sum(), [v for d in adapter.values() for v in d.values()])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        lora(adapter, torch.randn(4, 6))
    assert "forward" not in model.fc.__dict__ and "forward" in model.custom.__dict__
    assert_unchanged(before, model)


def _bad_leaves():
    """(description, function of a good adapter -> a bad one, what the message must name)."""
    def set_leaf(value_of):
        def make(a):
            bad = {p: dict(leaves) for p, leaves in a.items()}
            bad["0"]["lora_A"] = value_of(a["0"]["lora_A"])
            return bad
        return make

    return [
        ("float64 A, float32 B", set_leaf(lambda t: t.double()), r"adapter\['0'\]\['lora_B'\] has dtype torch.float32 "
                                                                r"but adapter\['0'\]\['lora_A'\] has torch.float64: a "
                                                                r"layer's LoRA factors must share one dtype"),
        ("int A", set_leaf(lambda t: t.to(torch.int64)), r"adapter\['0'\]\['lora_A'\] has dtype torch.int64"),
        ("bool A", set_leaf(lambda t: t > 0), r"has dtype torch.bool"),
        ("complex A", set_leaf(lambda t: t.to(torch.complex64)), r"has dtype torch.complex64"),
        ("list leaf", set_leaf(lambda t: t.tolist()), r"adapter\['0'\]\['lora_A'\] is a list, expected a torch.Tensor"),
        ("None leaf", set_leaf(lambda t: None), r"is a NoneType, expected a torch.Tensor"),
        ("float leaf", set_leaf(lambda t: 0.5), r"is a float, expected a torch.Tensor"),
        ("meta leaf", set_leaf(lambda t: t.to("meta")), r"adapter\['0'\]\['lora_A'\] is on the meta device"),
    ]


@pytest.mark.parametrize("case", _bad_leaves(), ids=lambda c: c[0])
@pytest.mark.parametrize("entry", ["forward", "merge", "delta", "route", "facade", "save"])
def test_bad_leaves_get_one_clear_error_at_every_entry_point(case, entry, tmp_path):
    """The forward path shares the adapter check: before, a meta factor silently dropped its
    layer's update and dtype / type mistakes failed deep inside torch without naming the leaf."""
    _, make_bad, message = case
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
    bad, x = make_bad(random_adapter(lora)), torch.randn(3, 4)
    before = snapshot(model)
    calls = {
        "forward": lambda: lora(bad, x),
        "merge": lambda: lora.merge(bad),
        "delta": lambda: lora.delta(bad),
        "route": lambda: lora.route({p: {k: [v, v] if not isinstance(v, torch.Tensor) else torch.stack([v, v])
                                         for k, v in leaves.items()} for p, leaves in bad.items()}, [0, 1, 0], x),
        "facade": lambda: fl.PeftModel(model, lora.config, bad),
        "save": lambda: fl.save_adapter(str(tmp_path / "a"), bad, lora=lora),
    }
    if entry in ("save", "route"):   # save names the leaf its own way; route's stack of a non-tensor is a list
        message = r"adapter\['0'\]\['lora_[AB]'\]"
    with pytest.raises((fl.AdapterMismatchError, TypeError), match=message):
        calls[entry]()
    assert_unchanged(before, model)
    assert not (tmp_path / "a").exists()
