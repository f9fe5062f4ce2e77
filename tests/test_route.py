"""``lora.route``: example i of a batch uses adapter index[i] (funclora/multi/route.py)."""

from __future__ import annotations

import contextlib
import copy

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funclora as fl
import funclora.multi.route as route_module
import funclora.multi.routed_weight as weight_module
from funclora.demo import MLP

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def _adapters(lora, n, seed=0):
    """n random adapters (non-zero B; saved modules and biases perturbed so they differ)."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        a = lora.init(generator=g)
        for path, leaves in a.items():
            for leaf, t in leaves.items():
                if path in lora.plan.saved or leaf == "bias":
                    leaves[leaf] = t + 0.5 * torch.randn(t.shape, generator=g)
                elif leaf.endswith("lora_B") or leaf.endswith("lora_embedding_A"):
                    leaves[leaf] = torch.randn(t.shape, generator=g) * 0.3
        out.append(a)
    return out


def _per_example(lora, adapters, index, *inputs, **kwargs):
    """The reference: each example alone with its own adapter."""
    rows = []
    for i, u in enumerate(index):
        args = [x[i:i + 1] for x in inputs]
        kw = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        rows.append(lora(adapters[u], *args, **kw))
    return torch.cat(rows)


@contextlib.contextmanager
def _branch(kind):
    """Force the strategies: "gathered" (A[index], B[index], bmm; saved modules once per distinct
    adapter) or "dense" (one matmul over all adapters, the others' part zeroed)."""
    saved = weight_module._DENSE_MAX, route_module._DENSE_SAVED_MACS
    weight_module._DENSE_MAX = route_module._DENSE_SAVED_MACS = -1 if kind == "gathered" else 10**12
    try:
        yield
    finally:
        weight_module._DENSE_MAX, route_module._DENSE_SAVED_MACS = saved


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# --- models -------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.c3 = nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")
        self.c4 = nn.Conv3d(4, 2, (1, 2, 2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):                                 # x (B, 3, 32)
        h = torch.relu(self.c1(x))                        # (B, 4, 32)
        h = h.reshape(h.shape[0], 4, 4, 8)
        h = torch.relu(self.c3(torch.relu(self.c2(h))))   # (B, 4, 2, 4)
        h = self.c4(h.unsqueeze(2).expand(-1, -1, 2, -1, -1).contiguous())   # (B, 2, 2, 1, 3)
        return self.head(h[..., :2].flatten(1))


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 5)

    def forward(self, ids):
        return self.out(self.norm(torch.relu(self.fc(self.emb(ids)))))


class AttnNet(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.out = nn.Linear(8, 3)

    def forward(self, x):                                 # x (B, T, 4)
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h, _ = self.attn(h, h, h)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.out(h)


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):                                 # x (B, T, 4)
        h, _ = self.lstm(x.transpose(0, 1))
        return self.out(h[-1])


def _mlp():
    torch.manual_seed(0)
    model = MLP(16).eval()
    cfg = fl.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], r=3, lora_alpha=6)
    return model, fl.LoRA(model, cfg)


# --- laws ---------------------------------------------------------------------------------------
@SETTINGS
@given(n=st.integers(1, 4), data=st.data(), kind=st.sampled_from(["gathered", "dense"]))
def test_route_equals_per_example_calls_mlp(n, data, kind):
    model, lora = _mlp()
    adapters = _adapters(lora, n)
    index = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=7))
    tokens = data.draw(st.sampled_from([(), (3,)]))  # x (B, 20) or (B, 3, 20)
    x = torch.randn(len(index), *tokens, 20)
    with fl.strict(), _branch(kind):                  # Linear layers: nothing materialized
        out = lora.route(fl.stack(adapters), index, x)
    _close(out, _per_example(lora, adapters, index, x))


@SETTINGS
@given(data=st.data())
def test_route_equals_per_example_calls_conv(data):
    torch.manual_seed(1)
    model = ConvNet().eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["c1", "c2", "c3", "c4"], modules_to_save=["head"], r=2))
    adapters = _adapters(lora, 3)
    index = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=5))
    x = torch.randn(len(index), 3, 32)
    with fl.strict():                                 # convs: one grouped conv per layer
        out = lora.route(fl.stack(adapters), torch.tensor(index), x)
    _close(out, _per_example(lora, adapters, index, x))


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(["gathered", "dense"]))
def test_route_equals_per_example_calls_embedding(data, kind):
    torch.manual_seed(2)
    model = TokenNet().eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["emb", "fc"], modules_to_save=["norm", "out"], r=2))
    adapters = _adapters(lora, 3)
    index = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=5))
    ids = torch.randint(0, 20, (len(index), 6))
    ids[0, :2] = 0                                    # padding_idx rows
    with fl.strict(), _branch(kind):
        out = lora.route(fl.stack(adapters), index, ids)
        flat = lora.route(fl.stack(adapters), index, ids[:, 0])      # ids (B,): one token per example
    _close(out, _per_example(lora, adapters, index, ids))
    _close(flat, _per_example(lora, adapters, index, ids[:, 0]))


@pytest.mark.parametrize("kind", ["gathered", "dense"])
def test_route_gpt2_conv1d_and_embedding(kind):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["c_attn", "c_proj", "c_fc", "wte"], r=2))
    adapters = _adapters(lora, 3)
    index = [2, 0, 0, 1, 2]
    ids = torch.randint(0, 50, (5, 7))
    with fl.strict(), _branch(kind):                  # Conv1D goes through torch.addmm on (B·T, in) rows
        out = lora.route(fl.stack(adapters), index, input_ids=ids, use_cache=False).logits
    ref = torch.cat([lora(adapters[u], input_ids=ids[i:i + 1], use_cache=False).logits for i, u in enumerate(index)])
    _close(out, ref, 2e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_route_falls_back_for_multihead_attention(batch_first):
    torch.manual_seed(4)
    model = AttnNet(batch_first).eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["inp", "attn"], modules_to_save=["out"], r=2))
    adapters = _adapters(lora, 3)
    index = [1, 1, 0, 2]
    x = torch.randn(4, 5, 4)
    out = lora.route(fl.stack(adapters), index, x)
    _close(out, _per_example(lora, adapters, index, x))
    with fl.strict(), pytest.raises(fl.MaterializationError, match="one forward pass per distinct adapter"):
        lora.route(fl.stack(adapters), index, x)


def test_route_falls_back_for_target_parameters():
    torch.manual_seed(5)
    model = LSTMNet().eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_parameters=["lstm.weight_ih_l0", "lstm.weight_hh_l0"], r=2))
    adapters = _adapters(lora, 2)
    index = [1, 0, 1]
    x = torch.randn(3, 5, 4)
    _close(lora.route(fl.stack(adapters), index, x), _per_example(lora, adapters, index, x))


def test_route_saved_module_used_directly_by_its_parent():
    # MultiheadAttention reads out_proj.weight itself; out_proj.forward is never called.
    torch.manual_seed(6)
    model = AttnNet(True).eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["inp"], modules_to_save=["attn.out_proj"], r=2))
    adapters = _adapters(lora, 3)
    index = [2, 0, 1, 0]
    x = torch.randn(4, 5, 4)
    _close(lora.route(fl.stack(adapters), index, x), _per_example(lora, adapters, index, x))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_route_trained_biases(bias):
    torch.manual_seed(7)
    model = TokenNet().eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["emb", "fc"], bias=bias, r=2))
    adapters = _adapters(lora, 3)
    index = [0, 2, 2, 1]
    ids = torch.randint(0, 20, (4, 6))
    with fl.strict():
        out = lora.route(fl.stack(adapters), index, ids)
    _close(out, _per_example(lora, adapters, index, ids))


def test_route_single_adapter_and_all_same_index():
    model, lora = _mlp()
    adapters = _adapters(lora, 2)
    x = torch.randn(4, 20)
    _close(lora.route(fl.stack(adapters), [1, 1, 1, 1], x), lora(adapters[1], x))
    _close(lora.route(fl.stack(adapters[:1]), [0, 0, 0, 0], x), lora(adapters[0], x))


def test_route_gradients_reach_each_examples_adapter():
    model, lora = _mlp()
    adapters = _adapters(lora, 3)
    index = [2, 0, 2]
    x = torch.randn(3, 20)
    grads = torch.func.grad(lambda s: lora.route(s, index, x).sum())(fl.stack(adapters))
    for k in (0, 2):
        rows = [i for i, u in enumerate(index) if u == k]
        want = torch.func.grad(lambda a: lora(a, x[rows]).sum())(adapters[k])
        for path, leaves in want.items():
            for leaf, g in leaves.items():
                _close(grads[path][leaf][k], g)
    assert all(not g.detach().any() for leaves in fl.select(grads, 1).values() for g in leaves.values())


# --- mode, purity, errors -----------------------------------------------------------------------
def test_route_runs_in_eval_mode_and_leaves_the_model_as_it_was():
    torch.manual_seed(8)
    model = MLP(16)
    model.train()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"],
                                        lora_dropout=0.9, r=2))
    adapters = _adapters(lora, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 20)
    index = [0, 1, 1, 0]
    out1 = lora.route(fl.stack(adapters), index, x)
    out2 = lora.route(fl.stack(adapters), index, x)
    _close(out1, out2)                                # no dropout: route is inference
    model.eval()
    _close(out1, _per_example(lora, adapters, index, x))
    model.train()
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_route_restores_forwards_when_the_model_raises():
    model, lora = _mlp()
    adapters = _adapters(lora, 2)
    with pytest.raises(RuntimeError):
        lora.route(fl.stack(adapters), [0, 1], torch.randn(2, 7))         # wrong feature size
    assert all("forward" not in m.__dict__ for m in model.modules())
    _close(lora.route(fl.stack(adapters), [0, 1], torch.randn(2, 20)).sum(0) * 0, torch.zeros(2))


def test_route_index_out_of_range_is_a_clear_error():
    model, lora = _mlp()
    stacked = fl.stack(_adapters(lora, 3))
    x = torch.randn(3, 20)
    with pytest.raises(IndexError, match=r"index\[1\] = 3 is out of range for a stack of N = 3"):
        lora.route(stacked, [0, 3, 1], x)
    with pytest.raises(IndexError, match=r"index\[2\] = -1 .* N = 3"):
        lora.route(stacked, torch.tensor([0, 1, -1]), x)


@pytest.mark.parametrize("index, error, match", [
    ([0, 1], ValueError, "has 2 entries but no input has 2 examples"),
    ([[0, 1, 0]], TypeError, "entries must be ints"),
    (torch.zeros(3, 1, dtype=torch.long), ValueError, "must be 1-D"),
    (torch.tensor([0.0, 1.0, 0.0]), TypeError, "must hold integers"),
    ([], ValueError, "is empty"),
    (3, TypeError, "list of ints or a 1-D integer tensor"),
])
def test_route_bad_index(index, error, match):
    model, lora = _mlp()
    with pytest.raises(error, match=match):
        lora.route(fl.stack(_adapters(lora, 2)), index, torch.randn(3, 20))


def test_route_needs_a_stacked_adapter():
    model, lora = _mlp()
    adapter = _adapters(lora, 1)[0]
    with pytest.raises(fl.AdapterMismatchError, match="LoRA.route"):
        lora.route(adapter, [0], torch.randn(1, 20))


# --- parity with PEFT's adapter_names -----------------------------------------------------------
def _peft_model(model, peft_kwargs, adapters):
    """A PEFT model with adapters ``a0 … a{n-1}`` holding the same values as ``adapters``."""
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**peft_kwargs), adapter_name="a0")
    for i in range(1, len(adapters)):
        pm.add_adapter(f"a{i}", peft.LoraConfig(**peft_kwargs))
    inner = pm.base_model.model
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            name = f"a{i}"
            for path, leaves in adapter.items():
                module = inner.get_submodule(path)
                for leaf, t in leaves.items():
                    if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
                        module.modules_to_save[name].get_parameter(leaf).copy_(t)
                    elif leaf.startswith("lora_embedding"):
                        getattr(module, leaf)[name].copy_(t)
                    else:
                        getattr(module, leaf)[name].weight.copy_(t)
    return pm.eval()


def test_route_matches_peft_adapter_names_mlp():
    model, lora = _mlp()
    adapters = _adapters(lora, 3)
    pm = _peft_model(model, dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], r=3, lora_alpha=6),
                     adapters)
    index = [2, 0, 0, 1, 2, 2]
    x = torch.randn(6, 20)
    want = pm(x, adapter_names=[f"a{u}" for u in index])
    _close(lora.route(fl.stack(adapters), index, x), want)


def test_route_matches_peft_adapter_names_conv_and_embedding():
    torch.manual_seed(9)
    conv = ConvNet().eval()
    # c2 (dilation) and c3 (padding_mode="reflect") hit PEFT conv defects (PEFT_LORA_SEMANTICS §2.4)
    kw = dict(target_modules=["c1", "c4"], modules_to_save=["head"], r=2, lora_alpha=4)
    lora = fl.LoRA(conv, fl.LoraConfig(**kw))
    adapters = _adapters(lora, 3)
    index = [1, 2, 1, 0]
    x = torch.randn(4, 3, 32)
    want = _peft_model(conv, kw, adapters)(x, adapter_names=[f"a{u}" for u in index])
    _close(lora.route(fl.stack(adapters), index, x), want)

    tokens = TokenNet().eval()
    kw = dict(target_modules=["emb", "fc"], r=2, lora_alpha=2)
    lora = fl.LoRA(tokens, fl.LoraConfig(**kw))
    adapters = _adapters(lora, 2)
    ids = torch.randint(0, 20, (3, 5))
    index = [1, 0, 1]
    want = _peft_model(tokens, kw, adapters)(ids, adapter_names=[f"a{u}" for u in index])
    _close(lora.route(fl.stack(adapters), index, ids), want)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")   # PEFT's Conv1D notice
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT on transformers 5
def test_route_matches_peft_adapter_names_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(10)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    kw = dict(target_modules=["c_attn", "c_proj", "wte"], r=2, lora_alpha=4)
    lora = fl.LoRA(model, fl.LoraConfig(**kw))
    adapters = _adapters(lora, 3)
    index = [0, 2, 2, 1]
    ids = torch.randint(0, 50, (4, 6))
    want = _peft_model(model, kw, adapters)(input_ids=ids, adapter_names=[f"a{u}" for u in index],
                                            use_cache=False).logits
    got = lora.route(fl.stack(adapters), index, input_ids=ids, use_cache=False).logits
    _close(got, want, 2e-5)
