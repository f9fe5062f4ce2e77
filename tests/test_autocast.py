"""Under ``torch.autocast`` (what ``Trainer(bf16=True)`` turns on) funclora runs as PEFT does."""

import copy
import warnings

import pytest
import torch

import funclora as fl

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_bf16_autocast_equals_peft(dora):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    kwargs = dict(target_modules=["0", "2"], r=4, use_dora=dora)
    lora = fl.LoRA(model, fl.LoraConfig(**kwargs))
    adapter = lora.init()
    for leaves in adapter.values():
        for leaf, t in leaves.items():
            if leaf != "lora_magnitude_vector":
                t.normal_(0, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).eval()
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for path, leaves in adapter.items():
            for leaf, value in leaves.items():
                params[f"base_model.model.{path}.{leaf}.default.weight"].copy_(value)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = lora(adapter, x), twin(x)
        grads = torch.func.grad(lambda a: lora(a, x).float().square().sum())(adapter)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    tol = dict(atol=4e-3, rtol=1e-2) if dora else dict(atol=0, rtol=0)   # DoRA's norm in bf16 matmuls
    torch.testing.assert_close(ours, theirs, **tol)
    assert all(g.isfinite().all() and g.abs().sum() > 0 for d in grads.values() for g in d.values())
