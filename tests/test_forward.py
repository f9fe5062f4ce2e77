"""funclora.core.forward: the overlay, the call's view of the model, and the forward against the dense
``W + s·B@A`` reference."""

import re

import pytest
import torch
from torch import nn

import funclora as fl
from conftest import assert_unchanged, random_adapter, snapshot
from funclora.core.bound import Bound
from funclora.core.forward import bind, forward, overlay, tensors, training_mode
from funclora.core.lazy import LoraWeight
from funclora.core.quantized import OutputRule


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) - 1


class Quantized(nn.Linear):
    """Stands in for a quantized linear: the output rule puts the branch on its output."""


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 6)
        self.own = OwnForward(6, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.attn = nn.MultiheadAttention(6, 2)
        self.quant = Quantized(6, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, ids):
        h = self.own(self.fc(self.emb(ids)))                        # (N, L, 6)
        h = self.conv(h.transpose(1, 2))                            # (N, 6, L)
        h = self.norm(h).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.drop(self.quant(h)))


def _setup(**kw):
    config = fl.LoraConfig(target_modules=["emb", "fc", "own", "conv", "attn", "quant"], modules_to_save=["head"],
                           r=2, lora_alpha=3, **kw)
    config.register_custom_module({Quantized: OutputRule()})
    model = Model().eval()
    lora = fl.LoRA(model, config)
    return model, Bound(model, config), random_adapter(lora, scale=0.3, seed=1)


def _dense_params(model, bound, adapter) -> dict:
    """The reference: every adapted weight W + s·B@A spelled out by hand, saved modules replaced."""
    s = 3 / 2
    p = {n: t.detach().clone() for n, t in model.named_parameters()}

    def ba(path, prefix=""):
        return adapter[path][prefix + "lora_B"].flatten(1) @ adapter[path][prefix + "lora_A"].flatten(1)

    p["emb.weight"] += s * (adapter["emb"]["lora_embedding_B"] @ adapter["emb"]["lora_embedding_A"]).T
    p["fc.weight"] += s * ba("fc")
    p["own.weight"] += s * ba("own")
    p["conv.weight"] += s * ba("conv").reshape(6, 6, 3)
    p["attn.in_proj_weight"] += s * ba("attn")
    p["attn.out_proj.weight"] += s * ba("attn", "out_proj.")
    p["quant.weight"] += s * ba("quant")            # the output branch equals the dense update
    p["head.weight"], p["head.bias"] = adapter["head"]["weight"], adapter["head"]["bias"]
    return p


# --- the forward ------------------------------------------------------------------------------
def test_forward_equals_the_dense_reference():
    model, bound, adapter = _setup()
    ids = torch.randint(0, 10, (3, 5))
    before = snapshot(model)
    with torch.no_grad():
        out = forward(bound, None, adapter, (ids,), {}, None)
    want = torch.func.functional_call(model, _dense_params(model, bound, adapter), (ids,))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out - model(ids)).abs().max() > 1e-2
    assert_unchanged(before, model)


def test_forward_with_gradients_reaches_only_the_adapter():
    model, bound, adapter = _setup()
    ids = torch.randint(0, 10, (3, 5))
    leaves = {(p, k): t.requires_grad_(True) for p, names in adapter.items() for k, t in names.items()}
    out = forward(bound, None, adapter, (ids,), {}, None)
    want = torch.func.functional_call(model, _dense_params(model, bound, adapter), (ids,))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves.values())
    assert all(p.grad is None for p in model.parameters())


def test_forward_with_explicit_params():
    model, bound, adapter = _setup()
    ids = torch.randint(0, 10, (2, 4))
    params = {n: 2 * t.detach() for n, t in model.named_parameters()}
    with torch.no_grad():
        out = forward(bound, params, adapter, (ids,), {}, None)
    doubled = Model().eval()
    doubled.load_state_dict({**model.state_dict(), **params})
    want = torch.func.functional_call(doubled, _dense_params(doubled, bound, adapter), (ids,))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_forward_in_training_mode_leaves_the_model_as_it_was():
    model, bound, adapter = _setup()
    ids = torch.randint(0, 10, (3, 5))
    before = snapshot(model)
    torch.manual_seed(3)
    out = forward(bound, None, adapter, (ids,), {}, True)          # dropout on, BatchNorm batch stats
    with training_mode(model, True):
        torch.manual_seed(3)
        want = torch.func.functional_call(model, {**_dense_params(model, bound, adapter),
                                                  **{n: b.clone() for n, b in model.named_buffers()}}, (ids,))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert_unchanged(before, model)                                 # flags, running stats untouched


def test_rnn_under_vmap_says_what_to_do():
    class WithLSTM(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x))[0]

    model = WithLSTM(nn.Linear(3, 3), nn.LSTM(3, 4))
    config = fl.LoraConfig(target_modules=["0"], r=2)
    lora, bound = fl.LoRA(model, config), Bound(model, config)
    stacked, x = fl.stack([lora.init(), lora.init()]), torch.randn(5, 3)
    with pytest.raises(RuntimeError) as info:
        torch.func.vmap(lambda a: forward(bound, None, a, (x,), {}, None))(stacked)
    assert re.fullmatch(
        r"LoRA: torch\.func\.vmap cannot run this model: it contains LSTM at \['1'\], and PyTorch has no "
        r"batching rule for aten::\w*lstm\w* \(nn\.LSTM / nn\.GRU / nn\.RNN cannot be vmapped\), so they cannot "
        r"see a stacked adapter or a vmapped input\. Run the adapters one at a time instead: "
        r"\[lora\(fl\.select\(stacked, i\), x\) for i in range\(n\)\], or lora\.route\(stacked, index, x\) for one "
        r"adapter per example; to batch many sequences, use the RNN's own batch dimension\.", str(info.value))


# --- training_mode ----------------------------------------------------------------------------
def test_training_mode_sets_then_restores_each_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Sequential(nn.BatchNorm1d(2)))
    model[1].eval()
    model[2][0].eval()
    flags = [m.training for m in model.modules()]
    assert flags == [True, True, False, True, False]
    with training_mode(model, False):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == flags
    with pytest.raises(KeyError):
        with training_mode(model, True):
            assert all(m.training for m in model.modules())
            raise KeyError("inside")
    assert [m.training for m in model.modules()] == flags          # restored on errors too
    with training_mode(model, None):                                # None: nothing is touched
        assert [m.training for m in model.modules()] == flags


# --- bind -------------------------------------------------------------------------------------
def test_bind_returns_a_view_sharing_untouched_children():
    model, bound, adapter = _setup()
    with torch.no_grad():
        view = bind(bound, None, adapter, None)
    assert type(view) is Model and view is not model
    for name in ("norm", "drop"):
        assert getattr(view, name) is getattr(model, name)
    for name in ("emb", "fc", "own", "conv", "attn", "quant", "head"):
        assert getattr(view, name) is not getattr(model, name)
    assert isinstance(view.fc, nn.Linear) and type(view.fc) is not nn.Linear      # the linear view
    assert type(view.own) is OwnForward and type(view.own.weight) is LoraWeight
    assert type(view.emb.weight) is LoraWeight and type(view.conv.weight) is LoraWeight
    assert isinstance(view.quant, Quantized) and type(view.quant) is not Quantized   # the output view
    assert view.head.weight is adapter["head"]["weight"]
    ids = torch.randint(0, 10, (2, 3))
    with torch.no_grad():
        torch.testing.assert_close(view(ids), forward(bound, None, adapter, (ids,), {}, None))
    trained = bind(bound, None, adapter, True)
    assert trained.norm is not model.norm and all(m.training for m in trained.modules())
    assert not model.training
    graded = bind(bound, None, adapter, None)              # with gradients every parameter is a detached copy
    assert graded.norm is not model.norm and graded.drop is model.drop
    assert graded.norm.weight is not model.norm.weight and not graded.norm.weight.requires_grad


# --- tensors / overlay ------------------------------------------------------------------------
def test_base_weights_are_detached_when_grad_is_enabled():
    model, bound, adapter = _setup()
    out = tensors(bound, None, adapter, None, {})
    assert out["norm.weight"] is not model.norm.weight and not out["norm.weight"].requires_grad
    assert out["norm.weight"].data_ptr() == model.norm.weight.data_ptr()            # detached, not copied
    assert not out["attn.in_proj_weight"].requires_grad                             # generic overlays too
    assert type(out["emb.weight"]) is LoraWeight and not out["emb.weight"]._lora.base.requires_grad
    with torch.no_grad():
        plain = tensors(bound, None, adapter, None, {})
    assert "norm.weight" not in plain and "attn.out_proj.bias" not in plain
    assert set(dict(model.named_parameters())) <= set(out)
    assert type(out["fc.weight"]) is torch.Tensor and not out["fc.weight"].requires_grad  # a linear view's W: in
    assert set(plain) == {"emb.weight", "own.weight", "conv.weight", "attn.in_proj_weight",   # views, not here
                          "attn.out_proj.weight", "head.weight", "head.bias"}


def test_buffers_are_cloned_in_training_mode_only():
    model, bound, adapter = _setup()
    with torch.no_grad():
        train = tensors(bound, None, adapter, True, {})
        evaluation = tensors(bound, None, adapter, None, {})
        model.train()
        own_flag = tensors(bound, None, adapter, None, {})
    buffers = dict(model.named_buffers())
    assert list(buffers) == ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
    for out in (train, own_flag):
        for name, b in buffers.items():
            assert out[name] is not b and torch.equal(out[name], b)
    assert not set(buffers) & set(evaluation)


def test_overlay_without_views_gives_lazy_weights_and_refuses_output_branches():
    model, bound, adapter = _setup()
    with pytest.raises(NotImplementedError) as info:
        overlay(bound, adapter, None)
    assert str(info.value) == (
        "LoRA: 'quant' (Quantized) gets its LoRA branch on its output, which only an eager call places (on the "
        "call's view of the model); torch.compile, FSDP2 and explicit overlays cannot. Call lora(adapter, x) "
        "eagerly for this model.")
    config = fl.LoraConfig(target_modules=["fc", "attn"], modules_to_save=["head"], bias="lora_only", r=2)
    small = Bound(model, config)
    a = random_adapter(fl.LoRA(model, config), seed=2)
    out = overlay(small, a, None)
    assert list(out) == ["fc.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight", "head.bias",
                         "fc.bias"]
    assert type(out["fc.weight"]) is LoraWeight and out["fc.weight"]._lora.base is model.fc.weight
    assert out["fc.bias"] is a["fc"]["bias"] and out["head.weight"] is a["head"]["weight"]
    ba = a["attn"]["out_proj.lora_B"] @ a["attn"]["out_proj.lora_A"]
    torch.testing.assert_close(out["attn.out_proj.weight"], model.attn.out_proj.weight + 4 * ba)


def test_overlay_with_views_places_linear_targets_in_views():
    model, bound, adapter = _setup(lora_dropout=0.25)
    views = {}
    out = overlay(bound, adapter, None, training=True, views=views)
    assert list(views) == ["fc", "quant"] and "fc.weight" not in out and "quant.weight" not in out
    cls, parts = views["fc"]
    assert cls is bound.linear_views["fc"][1]
    assert parts.base is model.fc.weight and parts.A is adapter["fc"]["lora_A"] and parts.B is adapter["fc"]["lora_B"]
    assert (parts.scaling, parts.layout, parts.dropout, parts.path) == (1.5, "linear", 0.25, "fc")
    assert views["quant"][1].dropout == 0.25 and views["quant"][1].base is None
    assert out["own.weight"]._lora.dropout == 0.25
    views = {}
    out = overlay(bound, adapter, None, training=None, views=views)                 # the model is in eval mode
    assert views["fc"][1].dropout == 0.0 and views["quant"][1].dropout == 0.0 and out["own.weight"]._lora.dropout == 0


def test_a_module_shared_under_two_paths_is_set_once():
    model = nn.Module()
    model.first = nn.Linear(3, 3)
    model.again = model.first
    config = fl.LoraConfig(target_modules=["first"], r=2, bias="all")
    bound = Bound(model, config)
    adapter = random_adapter(fl.LoRA(model, config))
    out = tensors(bound, None, adapter, None)
    assert "again.weight" not in out and "again.bias" not in out and "first.bias" in out

