"""Many adapters at once, funclora vs PEFT in the same run: ratios funclora / PEFT (lower is better).

Rows (N adapters, default 8; equal adapter values in both libraries, outputs checked first):

* ``vmap_same_input``: N adapters on one input. funclora: ``torch.func.vmap(lora, in_dims=(0, None))``
  over a stacked adapter, one call. PEFT: ``set_adapter(name)`` + forward, once per adapter.
* ``route``: a batch whose example i uses adapter ``i % N`` (shuffled). funclora:
  ``lora.route(stacked, index, x)``. PEFT: ``model(x, adapter_names=[...])``.
* ``train_n``: one optimisation step of all N adapters (a learning-rate sweep: N AdamW param
  groups, one per adapter). funclora: ``vmap(lora)`` over the stack of the N adapters' leaves,
  sum of the N losses, one ``.backward()``, one ``step()``. PEFT: for each adapter
  ``set_adapter`` + forward + backward + its own AdamW ``step()``, one after another.
* ``train_n_func_grad``: the funclora step through ``vmap(grad(loss))`` with SGD at N learning rates
  (stacked leaves, no optimizer object) vs the same PEFT loop with SGD.

Method: warm-up calls, then interleaved rounds (funclora then PEFT, then the reverse order, …),
each round timing enough calls to last ``--round-ms``; the table shows the median time per call
over rounds. On CUDA every round is bracketed by ``torch.cuda.synchronize()``. Nothing is
asserted: this is a measurement.

Usage (from the repository root)::

    .venv/bin/python benchmarks/multi_adapter.py                 # CPU, the seed guide's MLP
    .venv/bin/python benchmarks/multi_adapter.py --quick         # smoke run
    python3 benchmarks/multi_adapter.py --device cuda --dtype bfloat16   # Llama-like, hidden 2048

Workloads: CPU — the seed guide's MLP (20-2000-2000-2, LoRA r=8 on seq.0 / seq.2, seq.4 in
modules_to_save). CUDA — a randomly initialised Llama-like ``LlamaForCausalLM`` (hidden 2048,
intermediate 5632, 16 heads, ``--layers`` layers, vocab 32000), LoRA r=8 on q/k/v/o_proj.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import funclora as fl  # noqa: E402

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


# --- timing --------------------------------------------------------------------------------------
class Timer:
    def __init__(self, device, rounds, round_s):
        self.cuda = device.type == "cuda"
        self.rounds, self.round_s = rounds, round_s

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn, calls=1):
        self.sync()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - t) / calls

    def compare(self, fns: dict) -> dict:
        """Median seconds per call of each function over interleaved rounds."""
        for fn in fns.values():                                 # warm-up
            for _ in range(2):
                fn()
        counts = {name: max(1, min(1000, int(self.round_s / max(self.once(fn), 1e-7)))) for name, fn in fns.items()}
        times = {name: [] for name in fns}
        names = list(fns)
        for r in range(self.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                times[name].append(self.once(fns[name], counts[name]))
        return {name: statistics.median(ts) for name, ts in times.items()}


# --- models --------------------------------------------------------------------------------------
def _mlp(device, dtype):
    from funclora.demo import MLP

    model = MLP().to(device=device, dtype=dtype)
    kw = dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], r=8, lora_alpha=16)

    def batch(n):
        g = torch.Generator().manual_seed(n)
        return (torch.randn(n, 20, generator=g).to(device, dtype),), torch.randint(0, 2, (n,), generator=g).to(device)

    def loss(out, y):
        return F.nll_loss(out.float(), y)

    return model, kw, batch, loss, "seed MLP 20-2000-2000-2, r=8 on seq.0/seq.2, seq.4 saved"


def _llama(device, dtype, layers, seq, hidden=2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                      max_position_embeddings=max(2048, seq),
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    kw = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=8, lora_alpha=16)

    def batch(n):
        g = torch.Generator().manual_seed(n)
        ids = torch.randint(3, 32000, (n, seq), generator=g).to(device)
        return (ids,), ids

    def loss(out, labels):
        logits = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten())

    return model, kw, batch, loss, f"Llama-like hidden {hidden}, {layers} layers, seq {seq}, r=8 on q/k/v/o_proj"


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


# --- the two sides -------------------------------------------------------------------------------
def _random_adapters(lora, n, device):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        a = lora.init(generator=torch.Generator(device=device).manual_seed(100 + i))
        for path, leaves in a.items():
            for leaf, t in leaves.items():
                noise = torch.randn(t.shape, generator=g).to(device=t.device, dtype=t.dtype)
                leaves[leaf] = (t + 0.01 * noise) if path in lora.plan.saved else (0.05 * noise if "B" in leaf else t)
        out.append(a)
    return out


def _peft_copy(model, kw, adapters):
    import peft

    names = [f"a{i}" for i in range(len(adapters))]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, peft.LoraConfig(**kw))
    _load_values(pm, names, adapters)
    return pm, names


def _load_values(pm, names, adapters):
    """Copy funclora adapter values into the PEFT model's adapters ``names``."""
    import peft

    with torch.no_grad():
        for name, adapter in zip(names, adapters):
            for path, leaves in adapter.items():
                module = pm.base_model.model.get_submodule(path)
                for leaf, t in leaves.items():
                    if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
                        module.modules_to_save[name].get_parameter(leaf).copy_(t)
                    else:
                        getattr(module, leaf)[name].weight.copy_(t)


def _peft_params(pm, name):
    return [p for n, p in pm.named_parameters() if f".{name}." in n]


def _agree(a, b, what):
    a, b = a.float(), b.float()
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    if err > 3e-2 or not torch.isfinite(a).all():
        raise SystemExit(f"multi_adapter: {what}: funclora and PEFT disagree (max rel. error {err:.2e})")
    return err


# --- rows ----------------------------------------------------------------------------------------
def run(args) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.model == "llama":
        model, kw, batch, loss, note = _llama(device, dtype, args.layers, args.seq, args.hidden)
    else:
        model, kw, batch, loss, note = _mlp(device, dtype)
    model.eval().requires_grad_(False)
    n = args.n
    lora = fl.LoRA(model, fl.LoraConfig(**kw))
    adapters = _random_adapters(lora, n, device)
    stacked = fl.stack(adapters)
    pm, names = _peft_copy(model, kw, adapters)
    pm.eval()
    timer = Timer(device, args.rounds, args.round_ms / 1000)
    rows = []

    def row(metric, batch_size, times, check, extra=""):
        f, p = times["funclora"], times["peft"]
        rows.append(dict(metric=metric, batch=batch_size, funclora_ms=f * 1e3, peft_ms=p * 1e3, ratio=f / p,
                         check=check, note=extra))
        print(f"  {metric:20s} batch {batch_size:4d}  funclora {f * 1e3:9.3f} ms  PEFT {p * 1e3:9.3f} ms  "
              f"ratio {f / p:5.2f}   (max rel. diff {'-' if check is None else f'{check:.1e}'}) {extra}", flush=True)

    print(f"workload: {note}; N = {n} adapters; {args.device} {args.dtype}", flush=True)

    # 1. N adapters, same input
    for b in args.vmap_batch:
        inputs, _ = batch(b)
        vmapped = torch.func.vmap(lambda a, *xs: _logits(lora(a, *xs)), in_dims=(0,) + (None,) * len(inputs))

        def f_vmap():
            with torch.no_grad():
                return vmapped(stacked, *inputs)

        def p_loop():
            outs = []
            with torch.no_grad():
                for name in names:
                    pm.set_adapter(name)
                    outs.append(_logits(pm(*inputs)))
            return torch.stack(outs)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check = _agree(f_vmap(), p_loop(), "vmap_same_input")
        slow = any("performance drop" in str(w.message) for w in caught)
        row("vmap_same_input", b, timer.compare({"funclora": f_vmap, "peft": p_loop}), check,
            "(vmap fell back to a loop for some op)" if slow else "")

    # 2. per-example routing
    b = args.route_batch
    inputs, _ = batch(b)
    index = torch.arange(b) % n
    index = index[torch.randperm(b, generator=torch.Generator().manual_seed(0))].to(device)
    adapter_names = [names[i] for i in index.tolist()]

    def f_route():
        with torch.no_grad():
            return _logits(lora.route(stacked, index, *inputs))

    def p_route():
        with torch.no_grad():
            return _logits(pm(*inputs, adapter_names=adapter_names))

    check = _agree(f_route(), p_route(), "route")
    row("route", b, timer.compare({"funclora": f_route, "peft": p_route}), check)

    # 3. N adapters trained in one step, N learning rates
    for b in args.train_batch:
        _train_rows(lora, pm, names, adapters, batch, loss, n, b, device, model, timer, row)
    model.eval()
    return rows


def _train_rows(lora, pm, names, adapters, batch, loss, n, b, device, model, timer, row):
    """Rows ``train_n`` and ``train_n_func_grad`` at batch ``b``."""
    inputs, target = batch(b)
    _load_values(pm, names, adapters)                                   # both start from the same values
    lrs = [1e-5 * 2 ** i for i in range(n)]
    model.train()
    pm.train()
    sweep = [{p: {k: t.detach().clone().requires_grad_(True) for k, t in ls.items()} for p, ls in a.items()}
             for a in adapters]
    f_opt = torch.optim.AdamW([{"params": [t for ls in a.values() for t in ls.values()], "lr": lr}
                               for a, lr in zip(sweep, lrs)])
    p_opts = []
    for name, lr in zip(names, lrs):
        pm.set_adapter(name)
        p_opts.append(torch.optim.AdamW(_peft_params(pm, name), lr=lr))
    vm = torch.func.vmap(lambda a, *xs: _logits(lora(a, *xs)), in_dims=(0,) + (None,) * len(inputs))

    def f_train():
        out = vm(fl.stack(sweep), *inputs)                           # (N, batch, ...)
        total = sum(loss(out[i], target) for i in range(n))
        f_opt.zero_grad(set_to_none=True)
        total.backward()
        f_opt.step()
        return total.detach() / n

    def p_train():
        total = 0.0
        for name, opt in zip(names, p_opts):
            pm.set_adapter(name)
            value = loss(pm(*inputs), target)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total = total + value.detach()
        return total / n

    check = _agree(f_train(), p_train(), "train_n (mean loss)")
    row("train_n", b, timer.compare({"funclora": f_train, "peft": p_train}), check, "AdamW, N param groups")

    # 3b. the same through vmap(grad) and SGD at N learning rates (stacked leaves)
    stacked_t = fl.stack(adapters)
    lr_vec = torch.tensor(lrs, device=device)
    grad_fn = torch.func.vmap(torch.func.grad(lambda a, t, *xs: loss(lora(a, *xs), t)),
                              in_dims=(0, None) + (None,) * len(inputs))
    p_sgd = []
    for name, lr in zip(names, lrs):
        pm.set_adapter(name)
        p_sgd.append(torch.optim.SGD(_peft_params(pm, name), lr=lr))

    def f_grad():
        nonlocal stacked_t
        g = grad_fn(stacked_t, target, *inputs)
        stacked_t = {p: {k: t - lr_vec.view(-1, *[1] * (t.dim() - 1)).to(t.dtype) * g[p][k] for k, t in ls.items()}
                     for p, ls in stacked_t.items()}

    def p_grad():
        for name, opt in zip(names, p_sgd):
            pm.set_adapter(name)
            value = loss(pm(*inputs), target)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()

    row("train_n_func_grad", b, timer.compare({"funclora": f_grad, "peft": p_grad}), None, "SGD")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", choices=["mlp", "llama"], default=None,
                        help="default: mlp on CPU, llama on CUDA")
    parser.add_argument("--hidden", type=int, default=2048, help="llama: hidden size")
    parser.add_argument("--n", type=int, default=8, help="number of adapters")
    parser.add_argument("--vmap-batch", type=int, nargs="+", default=None)
    parser.add_argument("--route-batch", type=int, default=64)
    parser.add_argument("--train-batch", type=int, nargs="+", default=None)
    parser.add_argument("--layers", type=int, default=4, help="CUDA Llama-like: number of decoder layers")
    parser.add_argument("--seq", type=int, default=None, help="CUDA Llama-like: tokens per example")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--round-ms", type=float, default=150.0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="few short rounds (smoke test)")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("llama" if cuda else "mlp")
    llama = args.model == "llama"
    args.vmap_batch = args.vmap_batch or ([1, 4] if llama else [1, 64])
    args.train_batch = args.train_batch or ([4] if llama else [8, 64])
    args.seq = args.seq or 64
    if args.quick:
        args.rounds, args.round_ms = 3, 30.0
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft
    import transformers

    print(f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if cuda else ""), flush=True)
    rows = run(args)
    print("\nmetric               batch  funclora/PEFT")
    for r in rows:
        print(f"{r['metric']:20s} {r['batch']:5d}  {r['ratio']:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, dtype=args.dtype, n=args.n, rows=rows), f, indent=2)
    return rows


if __name__ == "__main__":
    main()
