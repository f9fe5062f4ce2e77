"""Re-entry: a checkpoint's recompute in backward and ``generate``'s many forwards see the call's
adapter, because they run on the call's own view of the model (funclora/core/shadow.py)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import funclora as fl
import tiny_transformers as tt
from conftest import assert_unchanged, snapshot
from peft_reference import load_into_peft


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), nn.Dropout(0.1)

    def forward(self, h):
        return h + self.fc2(self.drop(torch.nn.functional.gelu(self.fc1(h))))


class Checkpointed(nn.Module):
    """A custom model that checkpoints its blocks with ``torch.utils.checkpoint`` (or not)."""

    def __init__(self, reentrant: bool | None, width=16):
        super().__init__()
        self.reentrant = reentrant          # None: no checkpointing
        self.inp, self.out = nn.Linear(8, width), nn.Linear(width, 3)
        self.blocks = nn.ModuleList([Block(width) for _ in range(2)])

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h) if self.reentrant is None else checkpoint(block, h, use_reentrant=self.reentrant)
        return self.out(h)


def _adapter(lora, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {p: {k: (0.2 * torch.randn(v.shape, generator=g)).requires_grad_() for k, v in leaves.items()}
            for p, leaves in lora.init(generator=g).items()}


def _grads(adapter):
    return {p: {k: v.grad for k, v in leaves.items()} for p, leaves in adapter.items()}


@pytest.mark.parametrize("reentrant", [True, False])
def test_custom_checkpointing_trains_the_adapter(reentrant):
    torch.manual_seed(0)
    plain = Checkpointed(None).train()
    model = Checkpointed(reentrant).train()
    model.load_state_dict(plain.state_dict())
    config = fl.LoraConfig(target_modules=["inp", "fc1", "fc2", "out"], r=4, lora_dropout=0.1)
    x = torch.randn(5, 8)
    grads = {}
    for name, m in (("plain", plain), ("checkpointed", model)):
        lora, before = fl.LoRA(m, config), snapshot(m)
        adapter = _adapter(lora)
        torch.manual_seed(1)                 # same dropout masks: the recompute replays the RNG state
        lora(adapter, x).square().sum().backward()
        grads[name] = _grads(adapter)
        assert all(p.grad is None for p in m.parameters()), "a base parameter got a gradient"
        assert_unchanged(before, m)
    for path, leaves in grads["plain"].items():
        for leaf, g in leaves.items():
            assert g is not None and g.abs().sum() > 0, (path, leaf)
            torch.testing.assert_close(grads["checkpointed"][path][leaf], g, rtol=1e-5, atol=1e-6)


def test_two_graphs_alive_recompute_with_their_own_adapters():
    torch.manual_seed(0)
    model = Checkpointed(False).eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["inp", "fc1", "fc2"], r=4))
    x = torch.randn(5, 8)
    a, b = _adapter(lora, 1), _adapter(lora, 2)
    (lora(a, x).sum() + lora(b, x).square().sum()).backward()   # both graphs wait for backward together
    together = _grads(a), _grads(b)
    a2, b2 = _adapter(lora, 1), _adapter(lora, 2)
    lora(a2, x).sum().backward()
    lora(b2, x).square().sum().backward()
    for got, want in zip(together, (_grads(a2), _grads(b2))):
        for path in want:
            for leaf in want[path]:
                torch.testing.assert_close(got[path][leaf], want[path][leaf])


def _enable_checkpointing(model, reentrant):
    """transformers' gradient checkpointing (its current name; the old one warns FutureWarning)."""
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("reentrant", [True, False])
def test_transformers_gradient_checkpointing(reentrant):
    """Llama with transformers' checkpointing: façade and LoRA gradients equal the plain run."""
    plain = tt.build("llama").train()
    model = copy.deepcopy(plain)
    _enable_checkpointing(model, reentrant)
    config = fl.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4)
    batch = tt.inputs("llama")
    results = {}
    for name, m in (("plain", plain), ("checkpointed", model)):
        before = snapshot(m)
        lora = fl.LoRA(m, config)
        adapter = _adapter(lora)
        loss = lora(adapter, **batch).loss
        loss.backward()
        facade = fl.PeftModel(m, config, {p: {k: v.detach() for k, v in ls.items()} for p, ls in adapter.items()})
        facade.train()(**batch).loss.backward()
        results[name] = loss.detach(), _grads(adapter), {n: p.grad for n, p in facade.named_parameters()}
        assert all(p.grad is None for p in m.parameters()), "a base parameter got a gradient"
        assert_unchanged(before, m)
    (loss0, grads0, facade0), (loss1, grads1, facade1) = results["plain"], results["checkpointed"]
    torch.testing.assert_close(loss1, loss0)
    assert len(facade0) == 3 * 2 * 2
    for path in grads0:
        for leaf in grads0[path]:
            assert grads0[path][leaf].abs().sum() > 0
            torch.testing.assert_close(grads1[path][leaf], grads0[path][leaf], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(facade1[f"{path}.{leaf}"], facade0[f"{path}.{leaf}"], rtol=1e-5, atol=1e-7)


def test_generate_equals_peft():
    """``PeftModel.generate`` and ``lora.bind(adapter).generate``: PEFT's greedy tokens, model untouched."""
    model = tt.build("llama")
    config = dict(target_modules=["q_proj", "v_proj", "gate_proj"], r=4, lora_alpha=8)
    lora = fl.LoRA(model, fl.LoraConfig(**config))
    g = torch.Generator().manual_seed(3)
    adapter = {p: {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in ls.items()}
               for p, ls in lora.init().items()}
    ids = torch.randint(3, tt.VOCAB, (2, 5), generator=g)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # transformers' notes on generation defaults
        ours = fl.PeftModel(model, lora.config, adapter).generate(input_ids=ids, **settings)
        bound = lora.bind(adapter).generate(input_ids=ids, **settings)
        base = model.generate(input_ids=ids, **settings)
        twin = tt.peft_model(model, **config)
        load_into_peft(twin, adapter)
        theirs = twin.generate(input_ids=ids, **settings)
    assert_unchanged(before, model)
    assert torch.equal(ours, theirs) and torch.equal(bound, theirs)
    assert not torch.equal(ours, base)                     # the adapter changed what was generated
    with pytest.raises(AttributeError, match="has no `generate`"):
        fl.get_peft_model(nn.Sequential(nn.Linear(2, 2)), fl.LoraConfig(target_modules=["0"])).generate()
