"""``python -m funclora demo``: fine-tune the seed guide's MLP with LoRA on synthetic data."""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from .apply import LoRA
from .config import LoraConfig

__all__ = ["MLP", "make_data", "main"]


class MLP(nn.Module):
    """The seed guide's MLP: 20 → hidden → hidden → 2, log-probabilities out."""

    def __init__(self, num_units_hidden: int = 2000):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, X):
        return self.seq(X)


def make_data(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic two-class problem: ``X (n, 20)``, ``y (n,)`` from a random nonlinear rule."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 20, generator=g)
    w = torch.randn(20, generator=g)
    y = ((X @ w) + 0.5 * (X[:, 0] * X[:, 1]) > 0).long()
    return X, y


def _evaluate(lora, adapter, X, y):
    with torch.no_grad():
        logp = lora(adapter, X)
    return nn.functional.nll_loss(logp, y).item(), (logp.argmax(-1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns what it printed as numbers (used by the tests)."""
    parser = argparse.ArgumentParser(prog="python -m funclora demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = MLP(args.hidden).eval()
    config = LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])
    lora = LoRA(model, config)
    print(f"funclora demo: LoRA on the seed MLP (hidden={args.hidden}); targets {lora.targeted_module_names}, "
          f"saved {list(lora.plan.saved)}")
    adapter = lora.init(generator=torch.Generator().manual_seed(args.seed))
    lora.print_trainable_parameters(adapter)

    X, y = make_data(seed=args.seed)
    X_train, y_train, X_test, y_test = X[:1536], y[:1536], X[1536:], y[1536:]
    before = _evaluate(lora, adapter, X_test, y_test)
    print(f"before: test loss {before[0]:.4f}, accuracy {before[1]:.3f}")

    leaves = [t.requires_grad_() for leaves in adapter.values() for t in leaves.values()]
    optimizer = torch.optim.AdamW(leaves, lr=args.lr)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        idx = torch.randint(0, len(X_train), (128,), generator=g)
        loss = nn.functional.nll_loss(lora(adapter, X_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    after = _evaluate(lora, adapter, X_test, y_test)
    print(f"after {args.steps} steps ({seconds:.1f} s): test loss {after[0]:.4f}, accuracy {after[1]:.3f}")
    merged = lora.merge({p: {k: v.detach() for k, v in leaves.items()} for p, leaves in adapter.items()})
    same = torch.allclose(torch.func.functional_call(model, merged, (X_test,)), lora(adapter, X_test).detach(),
                          atol=1e-5)
    print(f"merged weights give the same outputs: {same}; the base model was not modified.")
    return {"before": before, "after": after, "merged_matches": same}


if __name__ == "__main__":  # pragma: no cover
    main()
