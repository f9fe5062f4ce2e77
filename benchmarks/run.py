"""funclora vs PEFT, side by side in one process: training, inference, memory and compile.

Every number is a ratio ``funclora / PEFT`` (lower is better) measured in the same run, on two
copies of one model with equal, non-zero adapter values, so both do the same arithmetic (the
script checks that their outputs agree before timing). Nothing is asserted: this is a
measurement, not a test.

Usage (from the repository root)::

    .venv/bin/python benchmarks/run.py --quick                      # under 3 min on 2 CPU cores
    .venv/bin/python benchmarks/run.py --json benchmarks/results/cpu.json   # full CPU mode
    python3 benchmarks/run.py --device cuda --json out/gpu.json     # what benchmarks/gpu.sh runs

Method:

* Timings: warm-up calls, then interleaved rounds (funclora, PEFT[, base], then the reverse
  order, ...), each round timing enough calls to last ``--round-ms``; the median over rounds is
  reported. On CUDA every round is bracketed by ``torch.cuda.synchronize()``.
* ``train``: forward + ``.backward()`` w.r.t. the adapter (grads set to None before each step,
  optimizer excluded), model in train mode, base weights frozen in both (PEFT freezes its copy;
  the funclora model gets ``requires_grad_(False)`` as a training script would do).
  ``train_func_grad``: funclora through ``torch.func.grad`` vs the same PEFT ``.backward()`` step.
* ``infer_unmerged``: ``torch.no_grad()`` forward in eval mode with the adapter unmerged; the
  row also carries the base model's time (``base``), and ``infer_overhead`` is the percentage
  over the base model. ``infer_merged``: funclora runs
  ``functional_call(model, lora.merge(adapter))``, PEFT its ``merge_and_unload()`` model;
  ``infer_merged_vs_base`` divides each by the base model's time.
* ``peak_memory``: extra memory of one training step above the built model, adapter and inputs.
  CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the step. CPU: a fresh
  subprocess per measurement that builds only one side, runs a warm-up step, resets the kernel's
  peak-RSS counter (``/proc/self/clear_refs``), and reads ``VmHWM - VmRSS`` around the step;
  glibc is told to return every large block to the kernel (``MALLOC_MMAP_THRESHOLD_``) so freed
  memory does not hide in the heap.
* ``compile_train``: the training step (loss function) under ``torch.compile(fullgraph=True)``,
  backward included; ``compile_time`` is the first call (compilation) in seconds, each side
  with a fresh inductor cache (``--warm-compile-cache`` lets the second reuse the first's).
* ``threads`` (workload ``mlp_b64``): inference throughput of 2 threads sharing one base model
  (``torch.set_num_threads(1)``; funclora: one adapter per thread, PEFT: its one active adapter)
  over one thread, every output checked against a serial run; ideal is 2.0 on 2 cores.
* ``llama_checkpointing``: the Llama-like training step with transformers' gradient checkpointing
  (``use_reentrant=False``) on both sides: time and peak memory (compare ``peak_memory_train`` with
  the ``llama`` row for what checkpointing saves).
* ``overhead_per_layer`` (workload ``tiny``: 4 ``Linear(8, 8)``, batch 1): (time per call −
  the base model's) / number of adapted layers, in µs, inference.

The JSON (``--json PATH``) is a list of rows ``{"workload", "metric", "funclora", "peft",
"ratio", "unit"}``, some with a ``base`` (the model without adapters) or a ``note``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import funclora as fl  # noqa: E402

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # PEFT's Conv1D notice, set anyway

# --- workloads -----------------------------------------------------------------------------------


@dataclass
class Workload:
    """One model + adapter config + batch + loss, identical for funclora and PEFT."""

    name: str
    build: Callable[[], nn.Module]          # a fresh fp32 model (called under a seed and a device)
    lora: dict                              # LoraConfig fields, same for both libraries
    batch: Callable[[torch.device], tuple]  # (args, kwargs, target)
    loss: Callable[[Any, Any], torch.Tensor]
    dtype: torch.dtype = torch.float32
    factors_in_base_dtype: bool = False     # funclora init(dtype="base"), PEFT autocast_adapter_dtype=False
    checkpointing: bool = False             # transformers gradient checkpointing on (both sides)
    quantize: str | None = None             # "nf4" / "int8": the decoder's Linears become bitsandbytes layers
    metrics: tuple = ("train", "train_func_grad", "infer", "merged", "memory", "compile")
    note: str = ""


def _nll(out, y):
    return F.nll_loss(out, y)


def _ce(out, y):
    return F.cross_entropy(out, y)


def _lm_loss(out, labels):
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def _mlp(batch: int) -> Workload:
    from funclora.demo import MLP

    def data(device):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(batch, 20, generator=g), torch.randint(0, 2, (batch,), generator=g)
        return (x.to(device),), {}, y.to(device)

    metrics = Workload.metrics + (("threads",) if batch == 64 else ())
    return Workload(f"mlp_b{batch}", MLP, dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]),
                    data, _nll, metrics=metrics, note="seed MLP 20-2000-2000-2, LoRA r=8 on seq.0/seq.2, seq.4 saved")


def _poolformer(batch: int, image: int) -> Workload:
    import timm

    def build():
        return timm.create_model("poolformer_s12", pretrained=False, num_classes=10)

    def data(device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, image, image, generator=g)
        return (x.to(device),), {}, torch.randint(0, 10, (batch,), generator=g).to(device)

    return Workload("poolformer_s12", build,
                    dict(target_modules=r".*\.mlp\.fc\d", modules_to_save=["head.fc"]), data, _ce,
                    note=f"timm poolformer_s12 random init, {batch}x3x{image}x{image}, LoRA r=8 on the "
                         "24 mlp 1x1 convs, head.fc saved")


def _tokens(batch, seq, vocab):
    def data(device):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        return (), {"input_ids": ids}, ids
    return data


def _llama(hidden, layers, seq, batch, vocab, dtype, all_linear=False, base_dtype_factors=False,
           checkpointing=False, quantize=None) -> Workload:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(4, hidden // 128)
    inter = int(8 * hidden / 3) // 64 * 64

    def build():
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                          max_position_embeddings=max(seq, 128), use_cache=False)
        return LlamaForCausalLM(cfg)

    if all_linear:
        targets, name, what = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], \
            "llama_all_linear", "all 7 projections"
    else:
        targets, name, what = ["q_proj", "v_proj"], "llama", "q_proj/v_proj (PEFT's default for llama)"
    factors = ""
    if checkpointing:
        name, factors = f"{name}_checkpointing", ", gradient checkpointing on (use_reentrant=False)"
    if quantize:
        name, factors = f"qlora_{quantize}", (f", decoder Linears quantized by bitsandbytes ({quantize}, "
                                              "fp32 compute), fp32 factors")
    if base_dtype_factors:
        name, factors = f"{name}_{str(dtype).removeprefix('torch.')}_factors", (
            f", factors in {str(dtype).removeprefix('torch.')} too (funclora init(dtype='base'), "
            "PEFT autocast_adapter_dtype=False)")
    metrics = Workload.metrics
    if all_linear or base_dtype_factors:
        metrics = ("train", "infer", "memory")
    if checkpointing:
        metrics = ("train", "memory")
    if quantize:
        metrics = ("train", "infer", "memory", "base_bytes")
    return Workload(name, build, dict(target_modules=targets, r=16, lora_alpha=32), _tokens(batch, seq, vocab),
                    _lm_loss, dtype=dtype, factors_in_base_dtype=base_dtype_factors, checkpointing=checkpointing,
                    quantize=quantize, metrics=metrics,
                    note=f"Llama-like: hidden {hidden}, {layers} layers, inter {inter}, vocab {vocab}, "
                         f"seq {seq}, batch {batch}, {str(dtype).removeprefix('torch.')}, LoRA r=16 on {what}"
                         + factors)


def _gpt2(hidden, layers, seq, batch, vocab) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel

    def build():
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=max(2, hidden // 64), vocab_size=vocab,
                         n_positions=max(seq, 128), use_cache=False, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)

    return Workload("gpt2_tiny", build, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
                    _tokens(batch, seq, vocab), _lm_loss,
                    note=f"GPT-2 tiny (transformers Conv1D): hidden {hidden}, {layers} layers, vocab {vocab}, "
                         f"seq {seq}, batch {batch}, LoRA r=8 on c_attn/c_proj/c_fc")


def _dora(wl: Workload) -> Workload:
    """The same workload with DoRA (``use_dora=True``) on both sides."""
    return dataclasses.replace(wl, name=f"dora_{wl.name}", lora={**wl.lora, "use_dora": True},
                               metrics=("train", "infer", "memory"), note=wl.note + "; DoRA (use_dora=True)")


def _tiny() -> Workload:
    def build():
        return nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])

    def data(device):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(1, 8, generator=g).to(device),), {}, torch.randn(1, 8, generator=g).to(device)

    return Workload("tiny", build, dict(target_modules=["0", "1", "2", "3"], r=4), data,
                    lambda out, y: F.mse_loss(out, y), metrics=("train", "infer", "overhead"),
                    note="4 x Linear(8, 8), batch 1, all 4 adapted (r=4): per-call Python overhead")


def workloads(device: str, quick: bool, dtype: str) -> list[Workload]:
    cuda = device.startswith("cuda")
    lm_dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
                "bfloat16": torch.bfloat16}[dtype]
    if cuda:
        shape = (2048, 8, 512, 8, 32000, lm_dtype)
        pool = _poolformer(32, 128)
        gpt2 = _gpt2(256, 4, 256, 16, 8192)
    elif quick:
        shape = (256, 2, 64, 4, 4096, lm_dtype)
        pool = _poolformer(4, 64)
        gpt2 = _gpt2(128, 2, 64, 4, 4096)
    else:
        shape = (512, 4, 128, 8, 8192, lm_dtype)
        pool = _poolformer(8, 64)
        gpt2 = _gpt2(256, 4, 128, 8, 8192)
    llama, llama_all = _llama(*shape), _llama(*shape, all_linear=True)
    llama_ckpt = _llama(*shape, checkpointing=True)
    qlora = [_llama(*shape, quantize=kind) for kind in ("nf4", "int8")]
    if cuda:  # the GPU targets are on the Llama-like model: measure it first, while the budget is fresh
        out = [llama, _tiny(), _mlp(64), _mlp(1024), gpt2, pool, llama_all, llama_ckpt]
        if lm_dtype != torch.float32:  # also with half-precision factors: the branch then runs on tensor cores
            out.insert(1, _llama(*shape, base_dtype_factors=True))
        return out
    mlp64 = _mlp(64)
    dora = [_dora(w) for w in (mlp64, pool, llama)]
    out = [_tiny(), mlp64, _mlp(1024), pool, llama, llama_ckpt, llama_all, gpt2, *qlora, *dora]
    if quick:  # compile and the memory subprocesses only where they are cheap
        for w in out:
            if w.name != "mlp_b64":
                w.metrics = tuple(m for m in w.metrics if m not in ("compile", "memory"))
        out = [w for w in out if w.name != "llama_all_linear"]
    return out


# --- the two sides -------------------------------------------------------------------------------

def _is_factor(leaf: str) -> bool:
    return leaf.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _peft_key(path: str, leaf: str) -> str:
    prefix = f"base_model.model.{path}"
    if leaf in ("lora_A", "lora_B", "lora_magnitude_vector"):
        return f"{prefix}.{leaf}.default.weight"
    if leaf in ("lora_embedding_A", "lora_embedding_B"):
        return f"{prefix}.{leaf}.default"
    return f"{prefix}.modules_to_save.default.{leaf}"


def build_model(wl: Workload, device) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = wl.build()
    if wl.checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = model.to(dtype=wl.dtype).requires_grad_(False)
    if wl.quantize:
        _quantize(model, wl.quantize)
    return model


def _quantize(model: nn.Module, kind: str) -> None:
    """Replace every nn.Linear of the decoder layers by a bitsandbytes layer with its weights."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and ".layers." in f".{name}":
            if kind == "int8":
                q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, quant_type=kind)
            q.load_state_dict(module.state_dict())
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, q.to(module.weight.device).requires_grad_(False))


def _model_mib(model: nn.Module, linears_only: bool = False) -> float:
    """Bytes of the parameters and buffers (with bitsandbytes' quantization statistics), in MiB."""
    modules = [m for n, m in model.named_modules() if ".layers." in f".{n}" and hasattr(m, "in_features")] \
        if linears_only else [model]
    total = 0
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            total += t.numel() * t.element_size()
            state = getattr(t, "quant_state", None)          # 4-bit: absmax per block (+ nested for double quant)
            extra = [getattr(state, "absmax", None), getattr(state, "code", None), getattr(t, "SCB", None)]
            total += sum(x.numel() * x.element_size() for x in extra if isinstance(x, torch.Tensor))
    return total / 2**20


def build_funclora(wl: Workload, model: nn.Module, device):
    """``(lora, adapter)`` with random non-zero factors (B is not left at zero)."""
    lora = fl.LoRA(model, fl.LoraConfig(**wl.lora))
    adapter = lora.init(dtype="base" if wl.factors_in_base_dtype else None)
    g = torch.Generator(device=device).manual_seed(1)
    for leaves in adapter.values():
        for leaf, t in leaves.items():
            if _is_factor(leaf):
                t.normal_(0.0, 0.02, generator=g)
    return lora, adapter


def build_peft(wl: Workload, model: nn.Module, adapter) -> nn.Module:
    import peft

    peft_model = peft.get_peft_model(model, peft.LoraConfig(**wl.lora),
                                     autocast_adapter_dtype=not wl.factors_in_base_dtype)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for path, leaves in adapter.items():
            for leaf, value in leaves.items():
                params[_peft_key(path, leaf)].copy_(value)
    return peft_model


@dataclass
class Side:
    """What a metric needs from one library: a loss on the batch, its trainable leaves, a forward."""

    forward: Callable[[], Any]
    loss: Callable[[], torch.Tensor]
    leaves: list
    set_mode: Callable[[bool], None]

    def clear(self):
        for t in self.leaves:
            t.grad = None

    def train_step(self):
        self.clear()
        self.loss().backward()


def funclora_side(wl, lora, adapter, batch) -> Side:
    args, kwargs, target = batch
    leaves = [t.requires_grad_(True) for d in adapter.values() for t in d.values()]
    return Side(lambda: lora(adapter, *args, **kwargs), lambda: wl.loss(lora(adapter, *args, **kwargs), target),
                leaves, lora.model.train)


def peft_side(wl, peft_model, batch) -> Side:
    args, kwargs, target = batch
    leaves = [p for p in peft_model.parameters() if p.requires_grad]
    return Side(lambda: peft_model(*args, **kwargs), lambda: wl.loss(peft_model(*args, **kwargs), target),
                leaves, peft_model.train)


# --- timing --------------------------------------------------------------------------------------

@dataclass
class Timer:
    device: str
    rounds: int
    round_s: float
    warmup: int = 2

    def sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def __call__(self, fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
        """Median seconds per call of each function, over interleaved rounds."""
        for fn in fns.values():
            for _ in range(self.warmup):
                fn()
        gc.collect()  # once (a full collection takes ~0.25 s with torch + transformers loaded) ...
        gc.disable()  # ... and no cyclic-GC pause inside the timed rounds
        try:
            return self._rounds(fns)
        finally:
            gc.enable()

    def _rounds(self, fns):
        counts = {}
        for name, fn in fns.items():
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            once = time.perf_counter() - start
            counts[name] = max(1, min(20000, int(self.round_s / max(once, 1e-7))))
        names = list(fns)
        samples = {n: [] for n in names}
        for r in range(self.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                fn, k = fns[name], counts[name]
                self.sync()
                start = time.perf_counter()
                for _ in range(k):
                    fn()
                self.sync()
                samples[name].append((time.perf_counter() - start) / k)
        return {n: statistics.median(s) for n, s in samples.items()}


def row(workload, metric, a, b, unit, **extra):
    ratio = a / b if a is not None and b not in (None, 0) and b > 0 and a >= 0 else None
    r = {"workload": workload, "metric": metric, "funclora": a, "peft": b, "ratio": ratio, "unit": unit}
    r.update({k: v for k, v in extra.items() if v is not None})
    return r


# --- memory --------------------------------------------------------------------------------------

def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def cpu_peak_child(args) -> None:
    """Subprocess entry: build one side of one workload, print the step's peak extra MiB as JSON."""
    wl = next(w for w in workloads(args.device, args.quick, args.dtype) if w.name == args._memory[0])
    side_name = args._memory[1]
    model = build_model(wl, "cpu")
    batch = wl.batch(torch.device("cpu"))
    lora, adapter = build_funclora(wl, model, "cpu")  # PEFT copies these values, then mutates `model`
    side = (funclora_side(wl, lora, adapter, batch) if side_name == "funclora"
            else peft_side(wl, build_peft(wl, model, adapter), batch))
    if side_name != "funclora":
        del lora, adapter
    side.set_mode(True)
    peaks = []
    for _ in range(3):
        side.train_step()
        side.clear()
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _rss_kib("VmRSS")
        side.train_step()
        peaks.append((_rss_kib("VmHWM") - before) / 1024)
    print(json.dumps({"peak_mib": statistics.median(peaks)}))


def cpu_peak(wl: Workload, side_name: str, args) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", wl.name, side_name, "--device", "cpu",
           "--dtype", args.dtype] + (["--quick"] if args.quick else []) + (
           ["--threads", str(args.threads)] if args.threads else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def cuda_peak(side: Side) -> float:
    side.train_step()
    side.clear()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    side.train_step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# --- one workload --------------------------------------------------------------------------------

@dataclass
class Budget:
    """Wall-clock budget: compile rows are skipped once ``compile_after_s`` has passed."""

    total_s: float
    compile_after_s: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _agree(a, b) -> float:
    a = a.logits if hasattr(a, "logits") else a
    b = b.logits if hasattr(b, "logits") else b
    return (a.float() - b.float()).abs().max().item()


def run_workload(wl: Workload, args, timer: Timer, budget: Budget, emit) -> None:
    """Measure every metric of ``wl``; a failing metric becomes an ``error`` row, the rest still run."""
    device = args.device
    cuda = device.startswith("cuda")
    model = build_model(wl, device)
    batch = wl.batch(torch.device(device))
    lora, adapter = build_funclora(wl, model, device)
    peft_model = build_peft(wl, copy.deepcopy(model), adapter)
    st = dict(wl=wl, args=args, timer=timer, emit=emit, model=model, batch=batch, lora=lora, adapter=adapter,
              fs=funclora_side(wl, lora, adapter, batch), ps=peft_side(wl, peft_model, batch),
              peft_model=peft_model, scale=1e6 if wl.name == "tiny" else 1e3,
              unit="µs" if wl.name == "tiny" else "ms")
    model.eval(), peft_model.eval()
    with torch.no_grad():
        diff = _agree(st["fs"].forward(), st["ps"].forward())
    print(f"  [{wl.name}] funclora vs PEFT outputs: max |diff| = {diff:.2e}", flush=True)

    steps = [("train", m_train), ("train_func_grad", m_func_grad), ("infer", m_infer), ("memory", m_memory),
             ("merged", m_merged), ("compile", m_compile), ("threads", m_threads), ("base_bytes", m_base_bytes)]
    for metric, fn in steps:
        if metric not in wl.metrics and not (metric == "infer" and "overhead" in wl.metrics):
            continue
        if metric == "compile" and budget.elapsed() > budget.compile_after_s:
            print(f"  [{wl.name}] compile rows SKIPPED: {budget.elapsed():.0f} s elapsed > "
                  f"{budget.compile_after_s:.0f} s of the time budget", flush=True)
            emit(row(wl.name, "compile_train", None, None, st["unit"], note="skipped: time budget"))
            continue
        try:
            fn(st)
        except Exception:  # noqa: BLE001 - one metric failing must not lose the others
            traceback.print_exc()
            emit(row(wl.name, metric, None, None, "-", note="error: " + traceback.format_exc().strip().splitlines()[-1]))
        finally:
            st["fs"].clear(), st["ps"].clear()
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
    st.clear()
    del model, lora, adapter, peft_model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def m_train(st):
    st["model"].train(), st["peft_model"].train()
    t = st["timer"]({"funclora": st["fs"].train_step, "peft": st["ps"].train_step})
    st["emit"](row(st["wl"].name, "train", t["funclora"] * st["scale"], t["peft"] * st["scale"], st["unit"]))


def m_func_grad(st):
    wl, lora, (args, kwargs, target) = st["wl"], st["lora"], st["batch"]
    st["model"].train(), st["peft_model"].train()
    detached = {p: {k: v.detach() for k, v in d.items()} for p, d in st["adapter"].items()}
    grad = torch.func.grad(lambda a: wl.loss(lora(a, *args, **kwargs), target))
    t = st["timer"]({"funclora": lambda: grad(detached), "peft": st["ps"].train_step})
    st["emit"](row(wl.name, "train_func_grad", t["funclora"] * st["scale"], t["peft"] * st["scale"], st["unit"],
                   note="funclora: torch.func.grad; PEFT: .backward()"))


def m_infer(st):
    wl, model, (args, kwargs, _) = st["wl"], st["model"], st["batch"]
    model.eval(), st["peft_model"].eval()
    with torch.no_grad():
        t = st["timer"]({"funclora": st["fs"].forward, "peft": st["ps"].forward,
                         "base": lambda: model(*args, **kwargs)})
    sc, emit = st["scale"], st["emit"]
    emit(row(wl.name, "infer_unmerged", t["funclora"] * sc, t["peft"] * sc, st["unit"], base=t["base"] * sc))
    over = {k: 100 * (t[k] / t["base"] - 1) for k in ("funclora", "peft")}
    emit(row(wl.name, "infer_overhead", over["funclora"], over["peft"], "% over base"))
    if "overhead" in wl.metrics:
        n = len(st["lora"].plan.targets)
        emit(row(wl.name, "overhead_per_layer", (t["funclora"] - t["base"]) * 1e6 / n,
                 (t["peft"] - t["base"]) * 1e6 / n, "µs/layer", note=f"{n} adapted layers, inference"))


def m_memory(st):
    wl, args = st["wl"], st["args"]
    st["model"].train(), st["peft_model"].train()
    if args.device.startswith("cuda"):
        mem = {"funclora": cuda_peak(st["fs"]), "peft": cuda_peak(st["ps"])}
        how = "CUDA allocator peak above the allocation before the step"
    else:
        mem = {"funclora": [], "peft": []}
        for _ in range(1 if args.quick else 2):  # fresh processes, interleaved; the median of each side
            for side_name in mem:
                mem[side_name].append(cpu_peak(wl, side_name, args))
        mem = {k: statistics.median(v) for k, v in mem.items()}
        how = "peak RSS above the RSS before the step, one process per measurement"
    st["emit"](row(wl.name, "peak_memory_train", mem["funclora"], mem["peft"], "MiB", note=how))


def m_merged(st):
    wl, model, lora, (args, kwargs, _) = st["wl"], st["model"], st["lora"], st["batch"]
    model.eval()
    with torch.no_grad():
        detached = {p: {k: v.detach() for k, v in d.items()} for p, d in st["adapter"].items()}
        merged = lora.merge(detached)
        merged_peft = copy.deepcopy(st["peft_model"]).merge_and_unload()  # keeps st["peft_model"] unmerged
        merged_peft.eval()

        def funclora_merged():
            return torch.func.functional_call(model, merged, args, kwargs, tie_weights=False)

        diff = _agree(funclora_merged(), merged_peft(*args, **kwargs))
        t = st["timer"]({"funclora": funclora_merged, "peft": lambda: merged_peft(*args, **kwargs),
                         "base": lambda: model(*args, **kwargs)})
    sc, emit = st["scale"], st["emit"]
    emit(row(wl.name, "infer_merged", t["funclora"] * sc, t["peft"] * sc, st["unit"], base=t["base"] * sc,
             note=f"merged outputs agree to {diff:.1e}"))
    emit(row(wl.name, "infer_merged_vs_base", t["funclora"] / t["base"], t["peft"] / t["base"], "x base"))


def m_base_bytes(st):
    """The quantized base's bytes against the same model in full precision (funclora adds none)."""
    wl = st["wl"]
    dense = build_model(Workload(wl.name, wl.build, wl.lora, wl.batch, wl.loss, wl.dtype), st["args"].device)
    linears = _model_mib(st["model"], linears_only=True) / _model_mib(dense, linears_only=True)
    st["emit"](row(wl.name, "base_mib_vs_fp32", _model_mib(st["model"]), _model_mib(dense), "MiB",
                   note=f"funclora column: the {wl.quantize} base model, which funclora leaves as it is (the adapter "
                        f"lives outside it); PEFT column: the same model unquantized; the quantized Linears alone: "
                        f"{linears:.3f}x their fp32 bytes (embeddings and the head stay fp32)"))


def m_threads(st):
    """Throughput of 2 threads sharing one base model (1 intra-op thread each) over 1 thread.

    funclora: thread k runs its own adapter (two adapters, one model); PEFT: both threads run its
    one active adapter (it has no per-call adapter). Every output is checked against a serial run.
    """
    import threading

    wl, lora, (args, kwargs, _) = st["wl"], st["lora"], st["batch"]
    st["model"].eval(), st["peft_model"].eval()
    adapter = {p: {k: v.detach() for k, v in d.items()} for p, d in st["adapter"].items()}
    other = {p: {k: v + 0.01 for k, v in d.items()} for p, d in adapter.items()}
    calls = {"funclora": [lambda: lora(adapter, *args, **kwargs), lambda: lora(other, *args, **kwargs)],
             "peft": [lambda: st["peft_model"](*args, **kwargs)] * 2}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            speedup, wrong = {}, {}
            for side, fns in calls.items():
                want = [fn() for fn in fns]
                n = max(20, int((0.2 if st["args"].quick else 0.5) / max(_wall(fns[0]), 1e-6)))
                bad = []

                def work(k, fn=None, want_k=None):
                    for _ in range(n):
                        out = fn()
                        if not torch.equal(out, want_k):
                            bad.append(k)

                one = min(_wall(lambda: work(0, fns[0], want[0])) for _ in range(3))
                two = []
                for _ in range(3):
                    ts = [threading.Thread(target=work, args=(k, fns[k], want[k])) for k in range(2)]
                    two.append(_wall(lambda: ([t.start() for t in ts], [t.join() for t in ts])))
                speedup[side] = 2 * one / min(two)
                wrong[side] = len(bad)
    finally:
        torch.set_num_threads(threads_before)
    st["emit"](row(wl.name, "threads", speedup["funclora"], speedup["peft"], "x one thread",
                   note=f"throughput of 2 threads (1 intra-op thread each) / 1 thread; wrong outputs: "
                        f"funclora {wrong['funclora']}, PEFT {wrong['peft']}"))


def _wall(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_COMPILE_WARM = []


def _warm_compiler(device):
    """Compile something trivial once, so neither side pays the compiler's one-time start-up."""
    if _COMPILE_WARM:
        return
    x = torch.randn(8, 8, device=device, requires_grad=True)
    torch.compile(lambda t: (t.sin() @ t).sum(), fullgraph=True)(x).backward()
    torch._dynamo.reset()
    _COMPILE_WARM.append(True)


def _fresh_inductor_cache():
    """A context with an empty inductor cache (``fresh_inductor_cache`` before torch 2.8)."""
    from torch._inductor import utils
    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    return fresh()


def m_compile(st):
    wl, lora, adapter, (args, kwargs, target) = st["wl"], st["lora"], st["adapter"], st["batch"]
    peft_model, timer = st["peft_model"], st["timer"]
    st["model"].train(), peft_model.train()
    _warm_compiler(st["args"].device)
    notes, steps, first = [], {}, {}
    for name, side, loss in (
        ("funclora", st["fs"], lambda a: wl.loss(lora(a, *args, **kwargs), target)),
        ("peft", st["ps"], lambda a: wl.loss(peft_model(*args, **kwargs), target)),
    ):
        for fullgraph in (True, False):
            compiled = torch.compile(loss, fullgraph=fullgraph)

            def step(compiled=compiled, side=side):
                side.clear()
                compiled(adapter).backward()
            try:
                # the two sides compile much the same kernels: with a shared cache the second
                # one found the first one's (2-3x faster on the seed MLP), so each starts cold
                cold = _fresh_inductor_cache() if st["args"].cold_compile else contextlib.nullcontext()
                with cold:
                    timer.sync()
                    start = time.perf_counter()
                    step()
                    timer.sync()
                first[name] = time.perf_counter() - start
                steps[name] = step
                if not fullgraph:
                    notes.append(f"{name}: fullgraph=True failed, fullgraph=False used")
                break
            except Exception as e:  # noqa: BLE001 - report, then try without fullgraph
                print(f"  [{wl.name}] {name} compile(fullgraph={fullgraph}) failed: "
                      f"{type(e).__name__}: {str(e)[:300]}", flush=True)
    if len(steps) < 2:
        raise RuntimeError(f"compile failed for {sorted(set(['funclora', 'peft']) - set(steps))}")
    t = timer(steps)
    sc = st["scale"]
    st["emit"](row(wl.name, "compile_train", t["funclora"] * sc, t["peft"] * sc, st["unit"],
                   note="; ".join(notes) or "fullgraph=True on both sides"))
    st["emit"](row(wl.name, "compile_time", first["funclora"], first["peft"], "s",
                   note="first call: compile forward + backward"))


# --- main ----------------------------------------------------------------------------------------

def machine_line(device: str) -> str:
    import peft
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    parts = [f"cpu: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if device.startswith("cuda"):
        parts.append(f"gpu: {torch.cuda.get_device_name(device)}")
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"peft {peft.__version__}"]
    for mod in ("transformers", "timm"):
        with contextlib.suppress(ImportError):
            versions.append(f"{mod} {__import__(mod).__version__}")
    return "machine: " + "; ".join(parts) + " | " + ", ".join(versions)


def fmt(v, unit):
    if v is None:
        return "-"
    if unit in ("%", "% over base"):
        return f"{v:+.1f}"
    return f"{v:.4g}"


def print_table(rows: list[dict]) -> str:
    lines = [f"{'workload':<24}{'metric':<22}{'funclora':>11}{'peft':>11}{'ratio':>8}  unit",
             "-" * 86]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        base = f"  (base {fmt(r['base'], r['unit'])})" if "base" in r else ""
        lines.append(f"{r['workload']:<24}{r['metric']:<22}{fmt(r['funclora'], r['unit']):>11}"
                     f"{fmt(r['peft'], r['unit']):>11}{ratio:>8}  {r['unit']}{base}")
    return "\n".join(lines)


_COLUMNS = [("train", "train"), ("train_func_grad", "train, func.grad"), ("infer_unmerged", "infer unmerged"),
            ("infer_overhead", "overhead over base: funclora / PEFT"), ("infer_merged", "infer merged"),
            ("peak_memory_train", "peak memory"), ("compile_train", "compiled train"),
            ("compile_time", "compile time")]


def markdown(rows: list[dict]) -> str:
    """The README table: one line per workload, the ratio per metric (overhead: both percentages)."""
    by = {}
    for r in rows:
        by.setdefault(r["workload"], {})[r["metric"]] = r
    lines = ["| workload | " + " | ".join(title for _, title in _COLUMNS) + " |",
             "|---" * (len(_COLUMNS) + 1) + "|"]
    for workload, metrics in by.items():
        cells = []
        for metric, _ in _COLUMNS:
            r = metrics.get(metric)
            if r is None or r["funclora"] is None:
                cells.append("–" if r is None else "skipped")
            elif metric == "infer_overhead":
                cells.append(f"{r['funclora']:+.1f}% / {r['peft']:+.1f}%")
            else:
                cells.append(f"{r['ratio']:.2f}" if r["ratio"] is not None else "–")
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    per_layer = [r for r in rows if r["metric"] == "overhead_per_layer"]
    for r in per_layer:
        lines.append(f"\n{r['workload']}: {r['funclora']:.1f} µs per adapted layer (PEFT {r['peft']:.1f} µs), "
                     "inference, over the base model")
    for r in rows:
        if r["metric"] == "threads" and r["funclora"] is not None:
            lines.append(f"\n{r['workload']}: 2 threads sharing one model give {r['funclora']:.2f}x one thread's "
                         f"throughput (PEFT {r['peft']:.2f}x); {r.get('note', '').split('; ')[-1]}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds (< 3 min on 2 CPU cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the Llama-like model (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--json", help="write the rows here (a JSON list)")
    p.add_argument("--only", nargs="*", help="run only these workloads")
    p.add_argument("--rounds", type=int, help="interleaved rounds per measurement")
    p.add_argument("--round-ms", type=float, help="target duration of one timing round")
    p.add_argument("--budget-s", type=float, default=0,
                   help="start no new workload after this many seconds (0: no limit)")
    p.add_argument("--compile-until-s", type=float, default=0,
                   help="start no compile rows after this many seconds (default: 0.6 x --budget-s)")
    p.add_argument("--warm-compile-cache", dest="cold_compile", action="store_false",
                   help="let the second side's compile reuse the first side's inductor cache "
                        "(faster; compile_time then favours the side measured second)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU; default: torch's choice)")
    p.add_argument("--markdown-from", metavar="JSON", help="print the README table of a results file and exit")
    p.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.markdown_from:
        with open(args.markdown_from) as f:
            print(markdown(json.load(f)))
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        return cpu_peak_child(args)

    cuda = args.device.startswith("cuda")
    rounds = args.rounds or (5 if args.quick else 9 if cuda else 15)
    round_s = (args.round_ms or (40 if args.quick else 60 if cuda else 120)) / 1e3
    timer = Timer(args.device, rounds, round_s, warmup=2)
    budget = Budget(args.budget_s or math.inf,
                    args.compile_until_s or (0.6 * args.budget_s if args.budget_s else math.inf))
    machine = machine_line(args.device)
    mode = "quick" if args.quick else "full"
    print(machine)
    print(f"mode: {mode}, device {args.device}, {rounds} interleaved rounds of ~{round_s * 1e3:.0f} ms, "
          f"median; ratio = funclora / PEFT (lower is better)", flush=True)

    rows: list[dict] = []

    def emit(r):
        rows.append(r)
        print("   ", print_table([r]).splitlines()[-1], flush=True)
        if args.json:  # written as we go, so a crash or a time limit keeps what was measured
            with open(args.json + ".tmp", "w") as f:
                json.dump(rows, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    notes = []
    for wl in workloads(args.device, args.quick, args.dtype):
        if args.only and wl.name not in args.only:
            continue
        if budget.elapsed() > budget.total_s:
            print(f"[{wl.name}] SKIPPED: time budget spent", flush=True)
            continue
        start = time.perf_counter()
        print(f"[{wl.name}] {wl.note}", flush=True)
        notes.append(f"{wl.name}: {wl.note}")
        try:
            run_workload(wl, args, timer, budget, emit)
        except Exception:  # noqa: BLE001 - one workload failing must not lose the others
            traceback.print_exc()
            emit(row(wl.name, "error", None, None, "-", note=traceback.format_exc().strip().splitlines()[-1]))
        print(f"  [{wl.name}] done in {time.perf_counter() - start:.1f} s "
              f"(total {budget.elapsed():.0f} s)", flush=True)
    if not args.only or "trainer" in args.only:  # transformers' Trainer step, façade vs PEFT (benchmarks/trainer_row.py)
        print("[trainer] transformers Trainer on a Llama-like model: funclora.trainer.Trainer + fl.get_peft_model "
              "vs transformers.Trainer + peft.get_peft_model", flush=True)
        notes.append("trainer: one Trainer optimizer step (forward, backward, clip, AdamW, schedule), median")
        try:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from trainer_row import trainer_rows

            for r in trainer_rows(args.device, args.quick):
                emit(r)
        except Exception:  # noqa: BLE001 - as for the workloads
            traceback.print_exc()
            emit(row("trainer", "error", None, None, "-", note=traceback.format_exc().strip().splitlines()[-1]))
    print()
    print(machine)
    print(f"mode: {mode}, device {args.device}; ratio = funclora / PEFT (lower is better)")
    print("\n".join(notes))
    print(print_table(rows))
    print(f"total {budget.elapsed():.0f} s")
    return rows


if __name__ == "__main__":
    main()
