"""Data-parallel and FSDP2 adapter training with funclora, launched by ``torchrun``.

One machine, N GPUs (or N CPU processes with gloo)::

    torchrun --nproc_per_node N benchmarks/train_distributed.py --strategy helper

Several nodes (run on every node; NODE_RANK is 0 .. NNODES-1, MASTER_ADDR a host all reach)::

    torchrun --nnodes NNODES --node_rank NODE_RANK --nproc_per_node N \\
        --rdzv_backend c10d --rdzv_endpoint MASTER_ADDR:29500 --rdzv_id myjob \\
        benchmarks/train_distributed.py --strategy fsdp --model llama

Strategies (``--strategy``):

* ``helper``: every rank holds the frozen base and the adapter pytree; after the backward
  ``funclora.distributed.all_reduce_grads`` averages the adapter's gradients (one bucket).
* ``ddp``: ``DistributedDataParallel(fl.get_peft_model(model, config))``; DDP sees only the
  adapter's parameters, so only they are broadcast and all-reduced.
* ``fsdp``: the base is sharded with FSDP2 ``fully_shard`` (each block, then the root); the
  adapter stays replicated and its gradients are averaged with ``all_reduce_grads``.

Each strategy runs the same steps with PEFT (``get_peft_model`` + DDP, or + ``fully_shard``)
from the same initial adapter and prints one table: ms/step, the ratio to PEFT, and the final
losses (equal up to float rounding). The global batch is split across ranks, so any world
size trains the same adapter.

Checkpoints: ``--save DIR`` writes the adapter (rank 0 only) plus the optimizer state;
``--resume DIR`` loads them on every rank and continues from the saved step with the same
losses (run ``--steps 20``; then ``--steps 10 --save ck`` and ``--steps 20 --resume ck``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import funclora as fl  # noqa: E402
from funclora.demo import MLP  # noqa: E402
from funclora.distributed import all_reduce_grads  # noqa: E402


# --- model, data and the units FSDP2 shards ---------------------------------------------------

def build(args):
    """``(model, config, batch, loss_fn, blocks)``, identical on every rank.

    ``batch(step) -> (inputs, targets)`` is the global batch of a step (seeded by the step, so a
    resumed run sees the same data); ``loss_fn(output, targets)`` its mean loss; ``blocks`` the
    submodules FSDP2 shards one by one before the root.
    """
    torch.manual_seed(args.seed)
    if args.model == "mlp":
        model = MLP(args.hidden)
        config = fl.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], r=args.r)

        def batch(step):
            g = torch.Generator().manual_seed(args.seed * 100_003 + step)
            X = torch.randn(args.batch, 20, generator=g)
            return X, ((X[:, :10].sum(-1) + X[:, 0] * X[:, 1]) > 0).long()

        return model, config, batch, nn.functional.nll_loss, [model.seq[i] for i in (0, 2, 4)]
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=max(256, args.seq))
    model = LlamaForCausalLM(cfg)
    config = fl.LoraConfig(target_modules=["q_proj", "v_proj"], r=args.r, lora_alpha=2 * args.r)

    def batch(step):
        g = torch.Generator().manual_seed(args.seed * 100_003 + step)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
        return ids, ids

    def loss_fn(out, ids):
        logits = out.logits[:, :-1]
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    return model, config, batch, loss_fn, list(model.model.layers)


def shard(model, blocks, device):
    """FSDP2: ``fully_shard`` each block, then the root (which takes what is left)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def local(batch, step, device):
    """This rank's rows of the global batch of ``step``: equal slices, so the mean over ranks of
    the per-rank mean losses is the global batch's mean loss."""
    inputs, targets = batch(step)
    rank, world, n = dist.get_rank(), dist.get_world_size(), inputs.shape[0]
    if n % world:
        raise SystemExit(f"--batch {n} must be divisible by the world size {world}")
    rows = slice(rank * n // world, (rank + 1) * n // world)
    return inputs[rows].to(device), targets[rows].to(device)


# --- PEFT's adapter as a funclora pytree (same initial values for both) --------------------------

_PEFT_KEY = re.compile(r"base_model\.model\.(.+?)\.(?:(lora_A|lora_B)\.default\.weight|modules_to_save\.default\.(.+))$")


def adapter_from_peft(peft_model) -> dict:
    adapter: dict = {}
    for name, p in peft_model.named_parameters():
        m = _PEFT_KEY.match(name)
        if m and p.requires_grad:
            adapter.setdefault(m.group(1), {})[m.group(2) or m.group(3)] = p.detach().clone()
    return adapter


# --- one training run ------------------------------------------------------------------------

def run(args, impl, device):
    model, config, batch, loss_fn, blocks = build(args)
    model.to(device)
    base_numel = sum(p.numel() for p in model.parameters())
    import peft

    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**_peft_fields(config)))
    init = adapter_from_peft(peft_model)
    start_step = 0
    if impl == "funclora":
        model.requires_grad_(False)  # frozen base: no base gradients computed (nor reduce-scattered under FSDP2)
        lora = fl.LoRA(model, config)
        if args.resume:
            init, start_step = load_checkpoint(args.resume, lora)
        init = {p: {k: init[p][k] for k in leaves} for p, leaves in lora.shapes().items()}  # stable order
        if args.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            facade = fl.PeftModel(model, config, init).to(device)
            forward = DDP(facade)  # registers the adapter only: the base is not a submodule of the façade
            params, adapter, reduce = list(forward.parameters()), facade.adapter, None
        else:
            if args.strategy == "fsdp":
                shard(model, blocks, device)
            adapter = {p: {k: v.to(device).requires_grad_() for k, v in leaves.items()} for p, leaves in init.items()}
            params = [t for leaves in adapter.values() for t in leaves.values()]

            def forward(x):
                return lora(adapter, x)

            def reduce():
                all_reduce_grads(adapter)
    else:
        peft_model.to(device)
        reduce = None  # DDP all-reduces, FSDP2 reduce-scatters PEFT's (sharded) adapter itself
        if args.strategy == "fsdp":
            shard(peft_model.base_model.model, [_peft_block(peft_model, b, model) for b in blocks], device)
            forward = peft_model
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            forward = DDP(peft_model)
        params = [p for p in forward.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    if impl == "funclora" and args.resume:
        optimizer.load_state_dict(torch.load(os.path.join(args.resume, "optimizer.pt"), weights_only=True))
    losses, times = [], []
    for step in range(start_step, args.steps):
        x, targets = local(batch, step, device)
        t0 = time.perf_counter()
        loss = loss_fn(forward(x), targets)
        optimizer.zero_grad()
        loss.backward()
        if reduce is not None:
            reduce()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(_global_mean(loss.detach()))
        if args.log_every and impl == "funclora" and dist.get_rank() == 0 and step % args.log_every == 0:
            print(f"step {step:4d}  loss {losses[-1]:.6f}", flush=True)
    if impl == "funclora" and args.save:
        save_checkpoint(args.save, adapter, config, optimizer, args.steps)
    n_adapter = sum(p.numel() for p in params) if impl == "funclora" else None
    warm = times[2:] or times
    return {"ms": 1000 * sum(warm) / max(len(warm), 1), "loss": losses[-1] if losses else float("nan"),
            "adapter_numel": n_adapter, "base_numel": base_numel}


def _peft_fields(config):
    return {"target_modules": config.target_modules, "modules_to_save": config.modules_to_save, "r": config.r,
            "lora_alpha": config.lora_alpha}


def _peft_block(peft_model, block, model):
    name = next(n for n, m in model.named_modules() if m is block)
    return peft_model.base_model.model.get_submodule(name)


def _global_mean(loss):
    t = loss.reshape(1).float().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


# --- checkpoints: rank 0 writes, every rank reads ---------------------------------------------

def save_checkpoint(folder, adapter, config, optimizer, step):
    """Rank 0 writes PEFT's adapter files, the optimizer state and the step; the others wait."""
    if dist.get_rank() == 0:
        fl.save_adapter(folder, {p: {k: v.detach().cpu() for k, v in leaves.items()} for p, leaves in adapter.items()},
                        config)
        torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
        with open(os.path.join(folder, "trainer.json"), "w") as f:
            json.dump({"step": step}, f)
    dist.barrier()  # nobody reads before rank 0 has written


def load_checkpoint(folder, lora):
    """Every rank reads the adapter (safetensors) and the step it was saved at."""
    adapter, _ = fl.load_adapter(folder, model=lora.model)  # checked against the model, init() order
    with open(os.path.join(folder, "trainer.json")) as f:
        return adapter, json.load(f)["step"]


# --- main -------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategy", choices=["helper", "ddp", "fsdp"], default="helper")
    parser.add_argument("--model", choices=["mlp", "llama"], default="mlp")
    parser.add_argument("--hidden", type=int, default=None, help="mlp: 2000, llama: 256")
    parser.add_argument("--layers", type=int, default=4, help="llama decoder layers")
    parser.add_argument("--seq", type=int, default=64, help="llama sequence length")
    parser.add_argument("--batch", type=int, default=64, help="global batch, split across ranks")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="default: nccl with CUDA, else gloo")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    parser.add_argument("--save", default=None, help="folder for the final adapter + optimizer state")
    parser.add_argument("--resume", default=None, help="folder written by --save")
    parser.add_argument("--log-every", type=int, default=0)
    args = parser.parse_args(argv)
    args.hidden = args.hidden or (2000 if args.model == "mlp" else 256)
    # PEFT 0.21 calls a deprecated transformers property; not ours to fix
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    cuda = torch.cuda.is_available() and args.backend != "gloo"
    dist.init_process_group(args.backend or ("nccl" if cuda else "gloo"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        rows = {"funclora": run(args, "funclora", device)}
        if not args.no_peft and not args.resume:
            rows["peft"] = run(args, "peft", device)
        if dist.get_rank() == 0:
            f = rows["funclora"]
            sent = ("base all-gathered per block, adapter gradients all-reduced" if args.strategy == "fsdp"
                    else "only the adapter is communicated")
            print(f"\n{args.strategy} · {args.model} · world {dist.get_world_size()} · {device.type} · "
                  f"steps {args.steps} · adapter {f['adapter_numel']:,} of {f['base_numel']:,} base params ({sent})")
            print(f"{'impl':<10}{'ms/step':>10}{'vs PEFT':>9}{'final loss':>14}")
            for impl, row in rows.items():
                ratio = f"{row['ms'] / rows['peft']['ms']:.2f}x" if "peft" in rows else "-"
                print(f"{impl:<10}{row['ms']:>10.2f}{ratio:>9}{row['loss']:>14.6f}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
