"""The lazy LoRA weight: factored ops, strict mode, materialization, guards, dtypes, dropout."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import funclora as fl
from conftest import random_adapter


def _gpt2_block_model():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return nn.Sequential(Conv1D(12, 6), nn.ReLU(), Conv1D(3, 12))


FACTORED = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)), ["0", "2"],
               lambda: torch.randn(4, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3, dilation=2, padding_mode="circular", padding=2)), ["0"],
               lambda: torch.randn(2, 3, 10)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="reflect")), ["0"],
               lambda: torch.randn(2, 3, 8, 8)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, (1, 1, 3))), ["0"], lambda: torch.randn(1, 2, 3, 4, 5)),
    "grouped_conv": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)), ["0"], lambda: torch.randn(1, 4, 6, 6)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(20, 6, padding_idx=1)), ["0"],
                  lambda: torch.randint(0, 20, (3, 5))),
    "conv1d_transformers": (_gpt2_block_model, ["0", "2"], lambda: torch.randn(2, 5, 6)),
}


@pytest.mark.parametrize("name", list(FACTORED))
def test_default_path_never_forms_the_dense_product(name):
    make, targets, make_x = FACTORED[name]
    model = make()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=targets, r=2))
    adapter = random_adapter(lora)
    with fl.strict():
        out = lora(adapter, make_x())
    assert out.shape == model(make_x()).shape


@pytest.mark.parametrize("name", [n for n in FACTORED if n != "grouped_conv"])
def test_factored_equals_dense(name):
    make, targets, make_x = FACTORED[name]
    model = make()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=targets, r=2))
    adapter = random_adapter(lora)
    x = make_x()
    torch.testing.assert_close(lora(adapter, x), torch.func.functional_call(model, lora.merge(adapter), (x,)),
                               atol=1e-5, rtol=1e-5)


class MatmulLinear(nn.Linear):
    """A Linear whose forward uses an op funclora does not factor (``x @ W.T``)."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_other_ops_materialize_correctly_and_strict_mode_refuses_them():
    model = nn.Sequential(MatmulLinear(4, 3))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2))
    adapter = random_adapter(lora)
    x = torch.randn(2, 4)
    torch.testing.assert_close(lora(adapter, x), torch.func.functional_call(model, lora.merge(adapter), (x,)))
    with fl.strict(), pytest.raises(fl.MaterializationError, match=r"'0' would form the dense"):
        lora(adapter, x)


def test_metadata_reads_do_not_materialize():
    class Reads(nn.Linear):
        def forward(self, x):
            w = self.weight
            assert w.shape == (3, 4) and w.dtype == torch.float32 and w.dim() == 2 and w.size(0) == 3
            assert w.device.type == "cpu" and isinstance(w.requires_grad, bool) and w.numel() == 12
            return F.linear(x, w, self.bias)

    lora = fl.LoRA(nn.Sequential(Reads(4, 3)), fl.LoraConfig(target_modules=["0"]))
    with fl.strict():
        lora(random_adapter(lora), torch.randn(2, 4))


def test_disabled_torch_function_is_refused_not_silently_ignored():
    model = nn.Sequential(nn.Linear(4, 3))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"]))
    adapter = random_adapter(lora)
    for context in (torch._C.DisableTorchFunctionSubclass, torch._C.DisableTorchFunction):
        with context(), pytest.raises(RuntimeError, match="torch function handling is disabled"):
            lora(adapter, torch.randn(2, 4))


def test_bf16_base_gets_fp32_factors_and_bf16_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).to(torch.bfloat16)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2))
    adapter = random_adapter(lora)
    assert adapter["0"]["lora_A"].dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = lora(adapter, x)
    assert out.dtype == torch.bfloat16
    a, b = adapter["0"]["lora_A"], adapter["0"]["lora_B"]
    s = lora.plan.targets["0"].scaling
    expected = model(x) + (s * ((x.float() @ a.T) @ b.T)).to(torch.bfloat16)
    torch.testing.assert_close(out, expected)
    kept = lora.init(dtype="base")
    assert kept["0"]["lora_A"].dtype == torch.bfloat16


def test_fp32_factors_over_bf16_base_agree_with_and_without_grad():
    # Without grad the scaling rides on the in-place add (alpha=s); with grad it scales x@Aᵀ.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=3, lora_alpha=7))  # s = 7/3
    adapter = {p: {k: v.requires_grad_() for k, v in leaves.items()} for p, leaves in random_adapter(lora).items()}
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    a, b = adapter["0"]["lora_A"].detach(), adapter["0"]["lora_B"].detach()
    peft_formula = (model(x).float() + (x.float() @ a.T) @ b.T * (7 / 3)).to(torch.bfloat16)
    with torch.no_grad():
        inference = lora(adapter, x)
    training = lora(adapter, x)
    assert training.requires_grad and not inference.requires_grad
    one_ulp = dict(atol=0, rtol=2 ** -7)  # one bf16 rounding step apart at most
    torch.testing.assert_close(inference, training.detach(), **one_ulp)
    torch.testing.assert_close(inference, peft_formula, **one_ulp)


def test_dropout_only_on_lora_branch_and_only_in_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], lora_dropout=0.5))
    adapter = random_adapter(lora)
    x = torch.randn(64, 16)
    model.eval()
    torch.testing.assert_close(lora(adapter, x), lora(adapter, x))
    model.train()
    a, b = lora(adapter, x), lora(adapter, x)
    assert not torch.allclose(a, b)
    zero_lora = {"0": {"lora_A": adapter["0"]["lora_A"], "lora_B": torch.zeros_like(adapter["0"]["lora_B"])}}
    torch.testing.assert_close(lora(zero_lora, x), model(x))  # the base path is never dropped
    stacked = fl.stack([adapter, adapter])
    outs = torch.func.vmap(lora, in_dims=(0, None), randomness="different")(stacked, x)
    assert not torch.allclose(outs[0], outs[1])


def test_embedding_padding_idx_gets_no_gradient_and_max_norm_leaves_factors_alone():
    model = nn.Sequential(nn.Embedding(10, 4, padding_idx=2, max_norm=0.1))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=3))
    adapter = random_adapter(lora, scale=5.0)
    before = adapter["0"]["lora_embedding_A"].clone()
    grads = torch.func.grad(lambda a: lora(a, torch.tensor([[2, 3, 2]])).sum())(adapter)
    assert torch.all(grads["0"]["lora_embedding_A"][:, 2] == 0)
    assert torch.any(grads["0"]["lora_embedding_A"][:, 3] != 0)
    assert torch.equal(adapter["0"]["lora_embedding_A"], before)
