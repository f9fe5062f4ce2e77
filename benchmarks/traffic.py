"""Kernels launched, bytes moved and FLOPs per step, funclora vs PEFT, counted op by op (no GPU).

``benchmarks/run.py`` times the two libraries; this script counts what each one asks the
device to do, at any shapes, on the ``meta`` device (no memory, no arithmetic). That makes it
exact and noise-free, and it runs the GPU's shapes on a CPU-only machine.

Usage (from the repository root)::

    .venv/bin/python benchmarks/traffic.py                                   # the GPU's Llama shapes
    .venv/bin/python benchmarks/traffic.py --json benchmarks/results/traffic_h200_shapes.json
    .venv/bin/python benchmarks/traffic.py --shapes cpu --only llama mlp_b64 # run.py's CPU shapes

What is counted, for each aten op that reaches the backend during one step (forward, and for
``train`` the ``.backward()`` too):

* ``kernels``: every op except views and metadata-only ops (``view``, ``t``, ``detach``, ...);
  in eager mode each of these is one kernel launch on a GPU (a few launch more than one).
* ``bytes``: the sizes of the op's tensor inputs and outputs, a lower bound on the memory
  traffic of that kernel (an in-place op counts its tensor twice: read and written).
* ``flops``: ``torch.utils.flop_counter``'s formulas (matmuls, convolutions, attention).

They are also turned into a roofline time (``--no-estimate``: counts only), op by op
``max(bytes / bandwidth, flops / peak of the op's dtype, --kernel-us)``, summed. The defaults are an H200's data-sheet
figures: 4.8 TB/s, 989 dense bf16 TFLOP/s, 67 fp32 TFLOP/s (TF32 off, PyTorch's default), and a
2 µs floor per kernel. Real kernels reach only part of those peaks (skinny matmuls far less), so
the estimate is a lower bound that ranks the two libraries; it does not predict their times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (benchmarks/run.py: the same workloads, sides and adapter values)

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT 0.21 on transformers 5

aten = torch.ops.aten

# Ops that only change metadata (no kernel): besides everything whose schema says it is a view.
_FREE = {aten._unsafe_view, aten.detach, aten.alias, aten.lift_fresh, aten.empty, aten.empty_like,
         aten.empty_strided, aten._local_scalar_dense, aten.set_, aten.resize_}
_FLOPS = {**flop_registry, aten.addmm_: flop_registry[aten.addmm]}


@dataclass
class Count:
    """What one step asks of the device."""

    kernels: int = 0
    bytes: int = 0
    flops: int = 0
    seconds: float = 0.0                    # the roofline estimate (see the module docstring)


@dataclass
class Roofline:
    """The least time an op can take; an H200's data-sheet figures by default."""

    bandwidth: float = 4.8e12               # bytes / s
    half_flops: float = 989e12              # bf16 / fp16 matmuls, FLOP / s
    fp32_flops: float = 67e12               # anything else (fp32 without TF32)
    kernel_s: float = 2e-6

    def seconds(self, nbytes: int, flops: int, dtype) -> float:
        peak = self.half_flops if dtype in (torch.bfloat16, torch.float16) else self.fp32_flops
        return max(nbytes / self.bandwidth, flops / peak, self.kernel_s)


class Counter(TorchDispatchMode):
    """Adds up every backend op run under it into :class:`Count` (see the module docstring)."""

    def __init__(self, roofline: Roofline):
        super().__init__()
        self.count, self.roofline = Count(), roofline

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if func.is_view or packet in _FREE:
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        formula = _FLOPS.get(packet)
        flops = int(formula(*args, out_val=out, **kwargs)) if formula is not None else 0
        c = self.count
        c.kernels += 1
        c.bytes += nbytes
        c.flops += flops
        c.seconds += self.roofline.seconds(nbytes, flops, tensors[0].dtype if tensors else None)
        return out


@contextlib.contextmanager
def _meta_friendly_transformers():
    """transformers checks position ids for packed sequences with a data-dependent ``.all()``,
    which meta tensors cannot answer; the benchmark's batches are never packed."""
    try:
        import transformers.masking_utils as masking
    except ImportError:
        yield
        return
    original = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


def _meta_batch(wl: run.Workload):
    """``wl``'s batch with the same shapes and dtypes, on the meta device."""
    args, kwargs, target = wl.batch(torch.device("cpu"))
    to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    return tuple(map(to_meta, args)), {k: to_meta(v) for k, v in kwargs.items()}, to_meta(target)


def measure(wl: run.Workload, roofline: Roofline) -> dict[str, Count]:
    """``{"train/funclora": Count, ..., "infer/base": Count}`` for one workload, on meta tensors."""
    import funclora as fl

    model = run.build_model(wl, "meta")
    lora = fl.LoRA(model, fl.LoraConfig(**wl.lora))
    adapter = lora.init(dtype="base" if wl.factors_in_base_dtype else None)
    peft_model = run.build_peft(wl, run.build_model(wl, "meta"), adapter)
    batch = _meta_batch(wl)
    sides = {"funclora": run.funclora_side(wl, lora, adapter, batch), "peft": run.peft_side(wl, peft_model, batch)}
    args, kwargs, _ = batch
    counts = {}
    with _meta_friendly_transformers():
        for name, side in sides.items():
            side.set_mode(True)
            with Counter(roofline) as c:
                side.train_step()
            counts[f"train/{name}"] = c.count
            side.set_mode(False)
            with torch.no_grad(), Counter(roofline) as c:
                side.forward()
            counts[f"infer/{name}"] = c.count
        model.eval()
        with torch.no_grad(), Counter(roofline) as c:
            model(*args, **kwargs)
        counts["infer/base"] = c.count
    return counts


def rows_of(wl: run.Workload, counts: dict[str, Count], estimate: bool) -> list[dict]:
    """Rows in ``run.py``'s format: per step, kernels, MB moved, GFLOP (and the estimate in ms)."""
    rows = []
    metrics = [("kernels", lambda c: c.kernels, "kernels"), ("traffic", lambda c: c.bytes / 1e6, "MB"),
               ("flops", lambda c: c.flops / 1e9, "GFLOP")]
    if estimate:
        metrics.append(("roofline", lambda c: c.seconds * 1e3, "ms (estimate)"))
    for step in ("train", "infer"):
        for metric, get, unit in metrics:
            base = counts.get(f"{step}/base")
            rows.append(run.row(wl.name, f"{metric}_{step}", get(counts[f"{step}/funclora"]),
                                get(counts[f"{step}/peft"]), unit, base=get(base) if base else None))
    f, p, b = (counts[f"infer/{s}"] for s in ("funclora", "peft", "base"))
    rows.append(run.row(wl.name, "infer_extra_traffic", (f.bytes - b.bytes) / 1e6, (p.bytes - b.bytes) / 1e6,
                        "MB over base"))
    rows.append(run.row(wl.name, "infer_extra_kernels", f.kernels - b.kernels, p.kernels - b.kernels,
                        "kernels over base"))
    if estimate:
        rows.append(run.row(wl.name, "infer_overhead_estimate", 100 * (f.seconds / b.seconds - 1),
                            100 * (p.seconds / b.seconds - 1), "% over base (estimate)"))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="cuda", choices=["cuda", "cpu"], help="run.py's shapes for that device")
    p.add_argument("--only", nargs="*", help="these workloads (default: the Llama-like ones)")
    p.add_argument("--json", help="write the rows here (a JSON list)")
    p.add_argument("--no-estimate", dest="estimate", action="store_false", help="counts only, no roofline")
    p.add_argument("--bandwidth-tbs", type=float, default=4.8, help="memory bandwidth, TB/s")
    p.add_argument("--bf16-tflops", type=float, default=989.0, help="dense bf16/fp16 matmul peak, TFLOP/s")
    p.add_argument("--fp32-tflops", type=float, default=67.0, help="fp32 matmul peak, TFLOP/s")
    p.add_argument("--kernel-us", type=float, default=2.0, help="the least time one kernel takes, µs")
    args = p.parse_args(argv)
    roofline = Roofline(args.bandwidth_tbs * 1e12, args.bf16_tflops * 1e12, args.fp32_tflops * 1e12,
                        args.kernel_us * 1e-6)
    only = args.only or [w.name for w in run.workloads(args.shapes, False, "auto") if w.name.startswith("llama")]
    print(run.machine_line("cpu"))
    print(f"shapes: run.py's {args.shapes} workloads, counted on the meta device; ratio = funclora / PEFT")
    if args.estimate:
        print(f"roofline: {args.bandwidth_tbs} TB/s, bf16 {args.bf16_tflops} / fp32 {args.fp32_tflops} TFLOP/s, "
              f"{args.kernel_us} µs per kernel at least (a lower bound, see the docstring)")
    rows = []
    for wl in run.workloads(args.shapes, False, "auto"):
        if wl.name not in only:
            continue
        print(f"[{wl.name}] {wl.note}", flush=True)
        new = rows_of(wl, measure(wl, roofline), args.estimate)
        print(run.print_table(new), flush=True)
        rows += new
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return rows


if __name__ == "__main__":
    main()
