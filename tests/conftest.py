"""Shared fixtures: the seed guide's MLP and random non-trivial adapters."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # lets test files import peft_reference

torch.set_num_threads(min(2, torch.get_num_threads()))


def random_adapter(lora, scale=0.1, seed=0, dtype=None):
    """An adapter with every leaf random (a fresh one is a no-op, which proves little)."""
    g = torch.Generator().manual_seed(seed)
    adapter = lora.init(generator=g, dtype=dtype)
    return {p: {k: (scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in leaves.items()}
            for p, leaves in adapter.items()}


class TiedLM(torch.nn.Module):
    """A language model whose lm_head shares the input embedding's weight (tied weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(7, 4)
        self.body = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 7, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.body(self.embed(ids)))


@pytest.fixture
def mlp():
    from funclora.demo import MLP

    torch.manual_seed(0)
    return MLP(64)


def snapshot(model):
    """Everything a funclora call must not change on a model."""
    return {
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "tree": [(n, type(m)) for n, m in model.named_modules()],
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
        "attributes": {n: sorted(m.__dict__) for n, m in model.named_modules()},   # e.g. no forward left behind
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
    }


def assert_unchanged(before, model):
    after = snapshot(model)
    assert before["tree"] == after["tree"]
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert before["ids"] == after["ids"]
    assert before["attributes"] == after["attributes"]
    for n, g in before["grads"].items():
        assert (g is None) == (after["grads"][n] is None) and (g is None or torch.equal(g, after["grads"][n])), n
    for n, (p, rg) in before["params"].items():
        assert torch.equal(p, after["params"][n][0]), n
        assert rg == after["params"][n][1], n
    for n, b in before["buffers"].items():
        assert torch.equal(b, after["buffers"][n]), n
