"""What the LoRA branch asks of the device, counted op by op (``benchmarks/traffic.py``).

Timings are noisy and live in ``benchmarks/``; kernel and byte counts are exact, so they are
tested: the branch costs a fixed number of kernels per adapted layer, and funclora never
launches more kernels or moves more bytes than PEFT for the same step.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import traffic  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT 0.21 on transformers 5

ADAPTED = 16  # q_proj and v_proj in 8 layers


def _counts(**kwargs):
    wl = traffic.run._llama(2048, 8, 512, 8, 32000, torch.bfloat16, **kwargs)  # the GPU benchmark's shapes
    return traffic.measure(wl, traffic.Roofline())


@pytest.fixture(scope="module")
def fp32_factors():
    return _counts()


def test_fp32_factors_over_bf16_base_cost_four_kernels_per_layer_in_inference(fp32_factors):
    # cast x to fp32, x@Aᵀ, h@Bᵀ, then the in-place add with s as its alpha (PEFT: six)
    base, ours, peft = (fp32_factors[f"infer/{s}"] for s in ("base", "funclora", "peft"))
    assert ours.kernels - base.kernels == 4 * ADAPTED
    assert peft.kernels - base.kernels == 6 * ADAPTED
    assert ours.flops == peft.flops
    assert ours.bytes - base.bytes < 0.6 * (peft.bytes - base.bytes)


def test_bf16_factors_cost_two_kernels_per_layer_in_inference():
    counts = _counts(base_dtype_factors=True)
    base, ours, peft = (counts[f"infer/{s}"] for s in ("base", "funclora", "peft"))
    assert ours.kernels - base.kernels == 2 * ADAPTED  # x@Aᵀ, then one in-place addmm
    assert ours.bytes - base.bytes < 0.5 * (peft.bytes - base.bytes)


def test_training_step_never_asks_more_of_the_device_than_peft(fp32_factors):
    ours, peft = fp32_factors["train/funclora"], fp32_factors["train/peft"]
    assert ours.flops == peft.flops
    assert ours.kernels <= peft.kernels
    assert ours.bytes <= peft.bytes
    assert ours.seconds <= peft.seconds  # the roofline estimate


def test_rows_carry_the_json_fields(fp32_factors):
    wl = traffic.run._llama(2048, 8, 512, 8, 32000, torch.bfloat16)
    rows = traffic.rows_of(wl, fp32_factors, estimate=True)
    assert {r["metric"] for r in rows} >= {"kernels_infer", "traffic_train", "infer_overhead_estimate"}
    for r in rows:
        assert {"workload", "metric", "funclora", "peft", "ratio", "unit"} <= r.keys()
