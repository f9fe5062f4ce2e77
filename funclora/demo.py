"""``python -m funclora demo``: fine-tune a model with LoRA on synthetic data, save, reload, check.

Two models, both built with random weights (nothing is downloaded):

* ``--model mlp`` (default): the seed guide's MLP (20 → 2000 → 2000 → 2), LoRA on ``seq.0`` and
  ``seq.2``, ``seq.4`` trained in full (``modules_to_save``), on a two-class problem in 20-D.
* ``--model timm``: timm's ``poolformer_s12``, LoRA on every ``.mlp.fc1`` / ``.mlp.fc2`` (1×1
  convolutions, matched by the regex ``r".*\\.mlp\\.fc\\d"``), ``head.fc`` trained in full, on
  32×32 synthetic images of three classes.

The demo prints the trainable-parameter line, loss and accuracy before and after training (with
a tqdm progress bar), saves the adapter in PEFT's format (``adapter_model.safetensors`` +
``adapter_config.json``), reloads it, checks the reloaded adapter gives the same outputs, checks
the merged weights give the same outputs, and checks the base model was not modified.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch import nn

from .core.config import LoraConfig
from .io import load_adapter, save_adapter
from .lora import LoRA

__all__ = ["MLP", "make_data", "make_images", "main"]


class MLP(nn.Module):
    """The seed guide's MLP: ``X (batch, 20)`` → ``(batch, 2)`` log-probabilities.

    Example:
        >>> import torch
        >>> from funclora.demo import MLP
        >>> MLP(num_units_hidden=16)(torch.randn(4, 20)).shape
        torch.Size([4, 2])
    """

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
    """A synthetic two-class problem: ``X (n, 20)`` float, ``y (n,)`` in {0, 1} from a nonlinear rule.

    Example:
        >>> from funclora.demo import make_data
        >>> X, y = make_data(n=8)
        >>> tuple(X.shape), tuple(y.shape), sorted(set(y.tolist())) <= [0, 1]
        ((8, 20), (8,), True)
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 20, generator=g)
    w = torch.randn(20, generator=g)
    y = ((X @ w) + 0.5 * (X[:, 0] * X[:, 1]) > 0).long()
    return X, y


def make_images(n: int = 1024, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images of three classes: ``X (n, 3, size, size)``, ``y (n,)`` in {0, 1, 2}.

    Class ``c`` has a brighter colour channel ``c`` in a random square patch, on Gaussian noise.

    Example:
        >>> from funclora.demo import make_images
        >>> X, y = make_images(n=4, size=16)
        >>> tuple(X.shape), tuple(y.shape)
        ((4, 3, 16, 16), (4,))
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    X = torch.randn(n, 3, size, size, generator=g)
    half = size // 2
    corner = torch.randint(0, size - half + 1, (n, 2), generator=g)
    for i in range(n):
        r, c = corner[i].tolist()
        X[i, y[i], r:r + half, c:c + half] += 1.5
    return X, y


def _mlp_setup(args):
    model = MLP(args.hidden).eval()
    config = LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])
    X, y = make_data(seed=args.seed)
    split = 1536
    description = f"the seed guide's MLP (hidden={args.hidden}), two classes in 20-D"
    return model, config, (X[:split], y[:split], X[split:], y[split:]), nn.functional.nll_loss, description


def _timm_setup(args):
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is in the test extra
        raise SystemExit("python -m funclora demo --model timm needs timm: pip install timm") from None
    model = timm.create_model("poolformer_s12", pretrained=False, num_classes=3).eval()
    config = LoraConfig(target_modules=r".*\.mlp\.fc\d", modules_to_save=["head.fc"])
    X, y = make_images(n=768, seed=args.seed)
    split = 512
    description = "timm poolformer_s12 (random init), three classes of 32×32 images"
    return model, config, (X[:split], y[:split], X[split:], y[split:]), nn.functional.cross_entropy, description


_MODELS = {"mlp": (_mlp_setup, 100, 128), "timm": (_timm_setup, 30, 32)}


def _evaluate(lora, adapter, X, y, loss_fn):
    with torch.no_grad():
        out = lora(adapter, X)
    return loss_fn(out, y).item(), (out.argmax(-1) == y).float().mean().item()


def _progress(steps: int, enabled: bool):
    if not enabled:
        return range(steps)
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the test extra: pip install -e ".[test]"
        print(f"training {steps} steps (pip install tqdm for a progress bar)")
        return range(steps)
    return tqdm(range(steps), desc="training", unit="step", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo (``argv`` as on the command line); return what it printed as numbers.

    Returns:
        ``{"model", "trainable", "before": (loss, accuracy), "after": (loss, accuracy),
        "seconds", "out" (the adapter folder), "reload_matches", "merged_matches",
        "base_unchanged"}``.

    Example:
        >>> import tempfile
        >>> from funclora.demo import main
        >>> with tempfile.TemporaryDirectory() as out:  # doctest: +ELLIPSIS
        ...     result = main(["--steps", "2", "--hidden", "16", "--no-progress", "--out", out])
        funclora demo: LoRA on the seed guide's MLP (hidden=16), two classes in 20-D...
        trainable params: 578 || all params: 1,220 || trainable%: 47.3770
        ...
        >>> result["reload_matches"], result["merged_matches"], result["base_unchanged"]
        (True, True, True)
    """
    parser = argparse.ArgumentParser(prog="python -m funclora demo",
                                     description="Fine-tune a model with LoRA on synthetic data, save the "
                                                 "adapter in PEFT's format, reload it and check it.")
    parser.add_argument("--model", choices=sorted(_MODELS), default="mlp",
                        help="mlp: the seed guide's MLP (default); timm: poolformer_s12 with conv LoRA")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 100 mlp, 30 timm)")
    parser.add_argument("--hidden", type=int, default=2000, help="hidden units of the MLP (default 2000)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the adapter (default: a new temporary folder)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    setup, default_steps, batch = _MODELS[args.model]
    steps = default_steps if args.steps is None else args.steps

    torch.manual_seed(args.seed)
    model, config, (X_train, y_train, X_test, y_test), loss_fn, description = setup(args)
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    lora = LoRA(model, config)
    targets = lora.targeted_module_names
    shown = targets if len(targets) <= 4 else [*targets[:2], "...", targets[-1]]
    print(f"funclora demo: LoRA on {description}.\n"
          f"  {len(targets)} LoRA targets {shown}; trained in full: {list(lora.plan.saved)}")
    adapter = lora.init(generator=torch.Generator().manual_seed(args.seed))
    lora.print_trainable_parameters(adapter)
    trainable = sum(t.numel() for leaves in adapter.values() for t in leaves.values())

    before = _evaluate(lora, adapter, X_test, y_test, loss_fn)
    print(f"before: test loss {before[0]:.4f}, accuracy {before[1]:.3f}")

    leaves = [t.requires_grad_() for leaves in adapter.values() for t in leaves.values()]
    optimizer = torch.optim.AdamW(leaves, lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    bar = _progress(steps, args.progress)
    for _ in bar:
        idx = torch.randint(0, len(X_train), (batch,), generator=g)
        loss = loss_fn(lora(adapter, X_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if hasattr(bar, "close"):
        bar.close()
    seconds = time.perf_counter() - start
    adapter = {p: {k: v.detach() for k, v in leaves.items()} for p, leaves in adapter.items()}
    after = _evaluate(lora, adapter, X_test, y_test, loss_fn)
    print(f"after {steps} steps ({seconds:.1f} s): test loss {after[0]:.4f}, accuracy {after[1]:.3f}")

    out = args.out if args.out is not None else tempfile.mkdtemp(prefix="funclora-demo-")
    save_adapter(out, adapter, lora=lora)
    files = ", ".join(sorted(f for f in os.listdir(out) if f.startswith("adapter_")))
    print(f"saved the adapter in PEFT's format to {out} ({files})")

    loaded, loaded_config = load_adapter(out, model=model)
    with torch.no_grad():
        expected = lora(adapter, X_test)
        reloaded = LoRA(model, loaded_config)(loaded, X_test)
        merged = torch.func.functional_call(model, lora.merge(adapter), (X_test,), tie_weights=False)
    reload_diff = (reloaded - expected).abs().max().item()
    reload_matches = torch.equal(reloaded, expected)
    merged_matches = torch.allclose(merged, expected, atol=1e-5, rtol=1e-5)
    base_unchanged = all(torch.equal(v, base[n]) for n, v in model.state_dict().items())
    print(f"reloaded from {out}: outputs match: {reload_matches} (max |diff| {reload_diff:.1e})")
    print(f"merged weights give the same outputs: {merged_matches}; "
          f"the base model was not modified: {base_unchanged}")
    print(f"load it with PEFT: PeftModel.from_pretrained(model, {out!r}), or with funclora: "
          f"fl.load_adapter({out!r}, model=model)")
    return {"model": args.model, "trainable": trainable, "before": before, "after": after, "seconds": seconds,
            "out": out, "reload_matches": reload_matches, "merged_matches": merged_matches,
            "base_unchanged": base_unchanged}


if __name__ == "__main__":  # pragma: no cover
    main()
