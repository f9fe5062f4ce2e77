"""torch.func.grad, vmap(grad), torch.compile(fullgraph=True) and inference_mode on the forward."""

import pytest
import torch
import torch.nn.functional as F

import funclora as fl
from conftest import random_adapter

# PyTorch's notice that vmap over CPU flash attention uses its slow fallback (results are exact).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented")


def _mlp_case(mlp):
    lora = fl.LoRA(mlp, fl.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]))
    x, y = torch.randn(8, 20), torch.randint(0, 2, (8,))
    return lora, (x,), lambda out: F.nll_loss(out, y)


def _llama_case():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    ids = torch.randint(0, 64, (2, 7))
    return lora, (ids,), lambda out: out.logits.float().logsumexp(-1).mean()


@pytest.fixture(params=["mlp", "llama"])
def case(request, mlp):
    return _mlp_case(mlp) if request.param == "mlp" else _llama_case()


def test_grad_and_vmap_grad(case):
    lora, args, loss = case
    adapters = [random_adapter(lora, seed=i) for i in range(3)]
    grad = torch.func.grad(lambda a: loss(lora(a, *args)))
    one = [grad(a) for a in adapters]
    many = torch.func.vmap(grad)(fl.stack(adapters))
    for i in range(3):
        for p in one[i]:
            for k in one[i][p]:
                torch.testing.assert_close(many[p][k][i], one[i][p][k], atol=1e-6, rtol=1e-5)


def test_inference_mode(case):
    lora, args, loss = case
    adapter = random_adapter(lora)
    expected = loss(lora(adapter, *args))
    with torch.inference_mode():
        torch.testing.assert_close(loss(lora(adapter, *args)), expected.detach())


@pytest.mark.slow
def test_compile_fullgraph(case):
    lora, args, loss = case
    adapter = random_adapter(lora)
    torch._dynamo.reset()
    step = torch.compile(lambda a, *xs: loss(lora(a, *xs)), fullgraph=True)
    torch.testing.assert_close(step(adapter, *args), loss(lora(adapter, *args)), atol=1e-5, rtol=1e-5)
    grads = torch.func.grad(lambda a: loss(lora(a, *args)))(adapter)
    leaves = {p: {k: v.clone().requires_grad_() for k, v in d.items()} for p, d in adapter.items()}
    step(leaves, *args).backward()
    for p in grads:
        for k in grads[p]:
            torch.testing.assert_close(leaves[p][k].grad, grads[p][k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compile_does_not_recompile_when_adapter_values_change(case):
    """One graph serves every adapter of the same shapes, also with FSDP imported (funclora then
    asks per call whether FSDP2 sharded the model: torch.compile takes that answer as a constant)."""
    import torch.distributed.fsdp  # noqa: F401

    lora, args, loss = case
    torch._dynamo.reset()
    step = torch.compile(lambda a, *xs: loss(lora(a, *xs)), fullgraph=True)
    step(random_adapter(lora, seed=0), *args)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for seed in (1, 2):
            adapter = random_adapter(lora, seed=seed)
            torch.testing.assert_close(step(adapter, *args), loss(lora(adapter, *args)), atol=1e-5, rtol=1e-5)
    finally:
        torch.compiler.set_stance("default")
