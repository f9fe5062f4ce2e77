"""The ``trainer`` row: one transformers ``Trainer`` training step, funclora's façade vs PEFT.

Both sides run the same ``Trainer`` (AdamW, linear schedule, batch from a ``datasets.Dataset``)
on two copies of one Llama-like model holding the same non-zero adapter; funclora's side is
``fl.get_peft_model`` in ``funclora.trainer.Trainer``, PEFT's ``peft.get_peft_model`` in
``transformers.Trainer``. The model runs in its own dtype (fp32 on CPU, bf16 on CUDA; fp32 factors),
without ``Trainer``'s autocast (``bf16=False``). A callback times each optimizer step (``on_step_begin`` to
``on_step_end``: forward, backward, clipping, optimizer and scheduler step); rounds alternate the
two sides (funclora first, then PEFT first, ...); the first step of every round is a warm-up and
dropped; the row reports the median step time (``ratio`` = funclora / PEFT, lower is better, as in
``run.py``) and each side's steps/s in ``note``. The first logged losses of the two sides are
compared before timing (they are equal up to float rounding).

Usage (from the repository root)::

    .venv/bin/python benchmarks/trainer_row.py            # quick CPU shape, prints the row
    .venv/bin/python benchmarks/trainer_row.py --full --json out.json

From ``run.py``: ``from trainer_row import trainer_rows; rows += trainer_rows(device, quick)``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import funclora as fl  # noqa: E402


def _shape(device: str, quick: bool) -> dict:
    if device.startswith("cuda"):
        return dict(hidden=2048, layers=8, seq=512, batch=8, vocab=32000, steps=12, rounds=4)
    if quick:
        return dict(hidden=256, layers=2, seq=64, batch=4, vocab=4096, steps=20, rounds=10)
    return dict(hidden=512, layers=4, seq=128, batch=8, vocab=8192, steps=12, rounds=6)


def trainer_rows(device: str = "cpu", quick: bool = True, dtype: torch.dtype | None = None) -> list[dict]:
    """``[row]`` in ``run.py``'s format: ``{"workload": "trainer", "metric": "trainer_step", ...}``."""
    import datasets
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    s = _shape(device, quick)
    cuda = device.startswith("cuda")
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    heads = max(4, s["hidden"] // 128)
    cfg = transformers.LlamaConfig(hidden_size=s["hidden"], intermediate_size=int(8 * s["hidden"] / 3) // 64 * 64,
                                   num_hidden_layers=s["layers"], num_attention_heads=heads,
                                   num_key_value_heads=heads, vocab_size=s["vocab"],
                                   max_position_embeddings=max(s["seq"], 128), use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    lora_cfg = dict(target_modules=["q_proj", "v_proj"], r=16, lora_alpha=32)
    lora = fl.LoRA(model, fl.LoraConfig(**lora_cfg))
    g = torch.Generator().manual_seed(1)
    adapter = {p: {k: (0.02 * torch.randn(v.shape, generator=g)).to(v) for k, v in leaves.items()}
               for p, leaves in lora.init().items()}
    ids = torch.randint(0, s["vocab"], (s["batch"] * s["steps"], s["seq"]), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})

    ours = fl.get_peft_model(model, fl.LoraConfig(**lora_cfg))
    with torch.no_grad():
        for path, leaves in adapter.items():
            for leaf, value in leaves.items():
                ours.adapter[path][leaf].copy_(value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**lora_cfg))
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, leaves in adapter.items():
            for leaf, value in leaves.items():
                params[f"base_model.model.{path}.{leaf}.default.weight"].copy_(value)

    from funclora.trainer import Trainer as FlTrainer

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self._t = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    out = tempfile.mkdtemp()
    args = transformers.TrainingArguments(
        out, per_device_train_batch_size=s["batch"], max_steps=s["steps"], logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, learning_rate=1e-4, use_cpu=not cuda, bf16=False,
        dataloader_num_workers=0, seed=0)
    sides = {"funclora": (FlTrainer, ours), "peft": (transformers.Trainer, theirs)}
    steps = {name: [] for name in sides}
    first_loss = {}
    for r in range(s["rounds"]):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            cls, m = sides[name]
            timer = StepTimer()
            trainer = cls(model=m, args=args, train_dataset=data, callbacks=[timer])
            trainer.remove_callback(transformers.PrinterCallback)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.train()
            first_loss.setdefault(name, trainer.state.log_history[0]["loss"])
            steps[name] += timer.times[1:]
    a, b = statistics.median(steps["funclora"]), statistics.median(steps["peft"])
    note = (f"Trainer step (AdamW) on a Llama-like model: hidden {s['hidden']}, {s['layers']} layers, seq {s['seq']}, "
            f"batch {s['batch']}, vocab {s['vocab']}, {str(dtype).removeprefix('torch.')}, LoRA r=16 on q_proj/v_proj; "
            f"steps/s funclora {1 / a:.2f}, PEFT {1 / b:.2f}; first logged loss "
            f"|diff| {abs(first_loss['funclora'] - first_loss['peft']):.1e}; "
            f"{len(steps['funclora'])} timed steps per side in {s['rounds']} alternating rounds")
    return [{"workload": "trainer", "metric": "trainer_step", "funclora": a, "peft": b, "ratio": a / b, "unit": "s",
             "note": note}]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full", action="store_true", help="the larger CPU shape (default: run.py's --quick shape)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = trainer_rows(args.device, quick=not args.full)
    for r in rows:
        print(f"{r['workload']:<10}{r['metric']:<14}funclora {r['funclora'] * 1e3:8.2f} ms  peft "
              f"{r['peft'] * 1e3:8.2f} ms  ratio {r['ratio']:.3f}\n  {r['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
