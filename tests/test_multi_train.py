"""Many adapters in one call: vmap over a stack, and training N adapters in one step.

Two ways to train N adapters at once, both giving each adapter exactly the gradient it gets
alone:

* ``torch.func.vmap(torch.func.grad(loss), in_dims=(0, None, None))(stacked, x, y)``;
* ordinary autograd: ``vmap(lora, in_dims=(0, None))(stacked, x)`` → per-adapter losses → their
  *sum* ``.backward()`` (the sum decouples: adapter ``k``'s leaves only see loss ``k``).

The sweep example at the end trains N adapters with N learning rates in one loop.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funclora as fl
from funclora.demo import MLP, make_data

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


def _setup(hidden=16, **kw):
    torch.manual_seed(0)
    model = MLP(hidden).eval().requires_grad_(False)     # frozen base: .backward() reaches adapters only
    cfg = fl.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], r=2,
                        init_lora_weights=False, **kw)
    return model, fl.LoRA(model, cfg)


def _adapters(lora, n):
    return [lora.init(generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _loss(lora, adapter, x, y):
    return nn.functional.nll_loss(lora(adapter, x), y)


def _close_trees(a, b, tol=1e-5):
    for path, leaves in b.items():
        for leaf, t in leaves.items():
            torch.testing.assert_close(a[path][leaf], t, atol=tol, rtol=tol)


# --- vmap over a stack equals the loop ----------------------------------------------------------
@SETTINGS
@given(n=st.integers(1, 4), batch=st.integers(1, 5))
def test_vmap_over_a_stack_equals_the_loop(n, batch):
    model, lora = _setup()
    adapters = _adapters(lora, n)
    stacked = fl.stack(adapters)
    x = torch.randn(batch, 20)
    same = torch.func.vmap(lora, in_dims=(0, None))(stacked, x)            # one input for all
    torch.testing.assert_close(same, torch.stack([lora(a, x) for a in adapters]), atol=1e-5, rtol=1e-5)
    xs = torch.randn(n, batch, 20)
    own = torch.func.vmap(lora, in_dims=(0, 0))(stacked, xs)               # each its own input
    torch.testing.assert_close(own, torch.stack([lora(a, xi) for a, xi in zip(adapters, xs)]),
                               atol=1e-5, rtol=1e-5)


# --- gradients ----------------------------------------------------------------------------------
@SETTINGS
@given(n=st.integers(1, 4))
def test_vmapped_grad_equals_per_adapter_grads(n):
    model, lora = _setup()
    adapters = _adapters(lora, n)
    x, y = make_data(8, seed=n)
    grads = torch.func.vmap(torch.func.grad(lambda a, x, y: _loss(lora, a, x, y)), in_dims=(0, None, None))(
        fl.stack(adapters), x, y)
    for k, a in enumerate(adapters):
        _close_trees(fl.select(grads, k), torch.func.grad(lambda a: _loss(lora, a, x, y))(a))


@SETTINGS
@given(n=st.integers(1, 4))
def test_backward_on_a_stacked_adapter_equals_per_adapter_grads(n):
    model, lora = _setup()
    adapters = _adapters(lora, n)
    x, y = make_data(8, seed=n)
    stacked = {p: {k: t.clone().requires_grad_(True) for k, t in leaves.items()} for p, leaves in fl.stack(adapters).items()}
    logp = torch.func.vmap(lora, in_dims=(0, None))(stacked, x)            # (n, batch, 2)
    losses = nn.functional.nll_loss(logp.flatten(0, 1), y.repeat(n), reduction="none").view(n, -1).mean(1)
    losses.sum().backward()
    for k, a in enumerate(adapters):
        leaves = {p: {leaf: t.clone().requires_grad_(True) for leaf, t in ls.items()} for p, ls in a.items()}
        _loss(lora, leaves, x, y).backward()
        want = {p: {leaf: t.grad for leaf, t in ls.items()} for p, ls in leaves.items()}
        _close_trees({p: {leaf: t.grad[k] for leaf, t in ls.items()} for p, ls in stacked.items()}, want)
    assert all(p.grad is None for p in model.parameters())


def test_vmap_training_with_dropout_needs_different_randomness():
    model, lora = _setup(lora_dropout=0.5)
    model.train()
    stacked = fl.stack(_adapters(lora, 3))
    x, y = make_data(8)
    out = torch.func.vmap(lora, in_dims=(0, None), randomness="different")(stacked, x)
    assert out.shape == (3, 8, 2) and not torch.allclose(out[0], out[1])
    model.eval()


# --- a learning-rate sweep in one run -----------------------------------------------------------
def test_sweep_n_learning_rates_with_vmap_grad_equals_separate_runs():
    """Stacked leaves, one ``vmap(grad)`` per step, SGD with a per-adapter learning rate."""
    model, lora = _setup()
    lrs = torch.tensor([0.0, 1e-2, 1e-1, 3e-1])
    x, y = make_data(32)
    start = _adapters(lora, 1)[0]
    stacked = fl.stack([start] * len(lrs))                                # N copies, N learning rates
    step = torch.func.vmap(torch.func.grad(lambda a, x, y: _loss(lora, a, x, y)), in_dims=(0, None, None))
    for _ in range(3):
        grads = step(stacked, x, y)
        stacked = {p: {k: t - lrs.view(-1, *[1] * (t.dim() - 1)) * grads[p][k] for k, t in leaves.items()}
                   for p, leaves in stacked.items()}
    for k, lr in enumerate(lrs.tolist()):
        alone = start
        for _ in range(3):
            g = torch.func.grad(lambda a: _loss(lora, a, x, y))(alone)
            alone = {p: {leaf: t - lr * g[p][leaf] for leaf, t in leaves.items()} for p, leaves in alone.items()}
        _close_trees(fl.select(stacked, k), alone)
    assert torch.equal(stacked["seq.0"]["lora_A"][0], start["seq.0"]["lora_A"])   # lr 0 did not move


def test_sweep_n_learning_rates_with_backward_and_adamw_param_groups():
    """Separate leaves (one param group per adapter), stacked inside the step: stock AdamW."""
    model, lora = _setup()
    lrs = [1e-3, 1e-2, 5e-2]
    x, y = make_data(32)
    start = _adapters(lora, 1)[0]

    def leaves_of(a):
        return {p: {k: t.clone().requires_grad_(True) for k, t in ls.items()} for p, ls in a.items()}

    def params(a):
        return [t for ls in a.values() for t in ls.values()]

    sweep = [leaves_of(start) for _ in lrs]
    opt = torch.optim.AdamW([{"params": params(a), "lr": lr} for a, lr in zip(sweep, lrs)])
    for _ in range(3):
        logp = torch.func.vmap(lora, in_dims=(0, None))(fl.stack(sweep), x)
        losses = torch.stack([nn.functional.nll_loss(lp, y) for lp in logp])
        opt.zero_grad()
        losses.sum().backward()
        opt.step()
    for a, lr in zip(sweep, lrs):
        alone = leaves_of(start)
        opt1 = torch.optim.AdamW(params(alone), lr=lr)
        for _ in range(3):
            opt1.zero_grad()
            _loss(lora, alone, x, y).backward()
            opt1.step()
        _close_trees(a, alone)


@pytest.mark.parametrize("n", [2])
def test_stack_select_unstack_round_trip(n):
    model, lora = _setup()
    adapters = _adapters(lora, n)
    stacked = fl.stack(adapters)
    for k, a in enumerate(fl.unstack(stacked)):
        _close_trees(a, adapters[k], tol=0)
        _close_trees(fl.select(stacked, k), adapters[k], tol=0)
