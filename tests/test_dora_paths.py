"""DoRA through every way a call reaches a layer: the view, the merged-weight fallback (a layer
with a forward of its own, torch.compile), quantized bases, fp16/bf16 bases, a fresh adapter
exactly the identity, and the errors where PEFT's DoRA dropout cannot be reproduced."""

import pytest
import torch
import torch.nn as nn

import funclora as fl
from funclora.core import dora
from funclora.core.dora_forward import linear_forward

MAG = "lora_magnitude_vector"


class OwnForwardLinear(nn.Linear):
    """A Linear whose forward is its own (funclora cannot reproduce it, so it gets the merged weight)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias) * 1.0


def _perturbed(lora, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {p: {k: v * (1 + 0.2 * torch.randn(v.shape, generator=g)) if k == MAG else 0.3 * torch.randn(v.shape, generator=g)
                for k, v in leaves.items()} for p, leaves in lora.init(generator=g).items()}


def _reference(layer, a, x):
    """PEFT's DoRA Linear in the dense form: m ⊙ (W + sBA)/‖W + sBA‖ applied to x, plus bias."""
    W = layer.weight.detach().float()
    updated = W + 2.0 * a["lora_B"] @ a["lora_A"]
    merged = a[MAG].reshape(-1, 1) * updated / updated.norm(dim=1, keepdim=True)
    return torch.nn.functional.linear(x, merged, layer.bias)


def test_a_fresh_dora_adapter_is_exactly_the_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 53), nn.Tanh(), nn.Linear(53, 44), nn.Unflatten(1, (11, 4)),
                          nn.Conv1d(11, 6, 3, padding=1, padding_mode="reflect"), nn.Conv1d(6, 6, 3, groups=2))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2", "4", "5"], r=4, use_dora=True))
    x = torch.randn(5, 37)
    assert torch.equal(lora(lora.init(), x), model(x))


def test_a_layer_with_its_own_forward_gets_the_merged_dora_weight():
    torch.manual_seed(0)
    model = nn.Sequential(OwnForwardLinear(6, 5))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2, lora_alpha=4, use_dora=True))
    assert lora.bound.dora["0"].view is None
    a, x = _perturbed(lora), torch.randn(3, 6)
    torch.testing.assert_close(lora(a, x), _reference(model[0], a["0"], x), atol=1e-5, rtol=1e-5)
    grads = torch.func.grad(lambda ad: lora(ad, x).square().sum())(a)
    assert all(g.abs().sum() > 0 for g in grads["0"].values())


def test_dropout_where_only_the_merged_weight_can_be_used_is_refused_naming_the_layer():
    model = nn.Sequential(OwnForwardLinear(6, 5)).train()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2, lora_dropout=0.1, use_dora=True))
    with pytest.raises(RuntimeError, match=r"DoRA layer '0' cannot apply lora_dropout=0.1 here: its class "
                                           r"OwnForwardLinear has a forward of its own"):
        lora(lora.init(), torch.randn(3, 6))
    model.eval()
    lora(lora.init(), torch.randn(3, 6))  # eval: no dropout, the merged weight is exact


def test_dropout_draws_one_mask_for_both_base_and_branch():
    """PEFT's formula with dropout: result + (scale − 1)·W·drop(x) + scale·s·B(A(drop(x))), one mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4)).train()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2, lora_alpha=4, lora_dropout=0.5, use_dora=True))
    a, x = _perturbed(lora), torch.randn(16, 8)
    torch.manual_seed(3)
    out = lora(a, x)
    torch.manual_seed(3)
    dropped = torch.nn.functional.dropout(x, 0.5, True)
    want = linear_forward(x, model[0].weight, model[0].bias, a["0"]["lora_A"], a["0"]["lora_B"], a["0"][MAG], 2.0,
                          x_dropped=dropped)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


def test_torch_compile_traces_the_merged_dora_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], r=2, use_dora=True))
    a, x = _perturbed(lora), torch.randn(4, 6)
    torch._dynamo.reset()
    compiled = torch.compile(lora, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(a, x), lora(a, x), atol=1e-5, rtol=1e-5)


def test_bf16_base_runs_in_bf16_with_fp32_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2, use_dora=True))
    a = lora.init()
    assert a["0"][MAG].dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = lora(a, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x).float(), atol=2e-2, rtol=2e-2)  # PEFT's bf16 rounding of m


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_int8_base_equals_the_dense_dora_of_its_dequantized_weight():
    bnb = pytest.importorskip("bitsandbytes")
    from funclora.core.quantized import dequantized_weight

    torch.manual_seed(0)
    dense = nn.Linear(64, 128)
    layer = bnb.nn.Linear8bitLt(64, 128, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(dense.state_dict())
    model = nn.Sequential(layer.to("cpu")).train()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=4, lora_alpha=8, use_dora=True))
    a, x = _perturbed(lora), torch.randn(5, 64)
    W = dequantized_weight(layer).float()
    assert lora.init()["0"][MAG].shape == (128,)
    with torch.no_grad():
        out = lora(a, x)
        result = model(x)
    want = linear_forward(x, W, layer.bias, a["0"]["lora_A"], a["0"]["lora_B"], a["0"][MAG], 2.0, result=result)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora.init()["0"][MAG], W.norm(dim=1), atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="'0'"):
        lora.merge(a)


def test_dora_norm_follows_an_in_place_update_of_the_base():
    """Nothing about the base is cached across calls: a write through .data (no version bump) is seen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2, lora_alpha=4, use_dora=True))
    a, x = _perturbed(lora), torch.randn(3, 6)
    lora(a, x)
    model[0].weight.data.mul_(3.0)
    torch.testing.assert_close(lora(a, x), _reference(model[0], a["0"], x), atol=1e-5, rtol=1e-5)


def test_norm_matches_the_dense_norm_for_every_kind():
    torch.manual_seed(0)
    W, A, B = torch.randn(7, 5), torch.randn(3, 5), torch.randn(7, 3)
    torch.testing.assert_close(dora.weight_norm(W, A, B, 0.5, "linear"), (W + 0.5 * B @ A).norm(dim=1))


def test_facade_mixed_batch_with_dora_routes_forward_and_refuses_generate():
    """A forward with adapter_names routes DoRA rows (once per adapter); generate refuses, naming the
    layers, because a shared KV cache cannot follow one pass per adapter (PEFT refuses both)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=50)).eval()
    façade = fl.get_peft_model(model, fl.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, use_dora=True,
                                                    init_lora_weights=False)).eval()
    ids = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        out = façade(ids, adapter_names=["default", "__base__", "default"], use_cache=False).logits
        torch.testing.assert_close(out[1], model(ids[1:2]).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[0], façade(ids[:1]).logits[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match=r"adapter_names= needs every target routed layer by layer, but "
                                                  r"\['model.layers.0.self_attn.q_proj'.*DoRA"):
        façade.generate(ids, max_new_tokens=2, adapter_names=["default", "__base__", "default"])


def test_route_refuses_a_kv_cache_it_would_share_between_adapters():
    """Run once per adapter, two equal groups would both append to one DynamicCache (no error, wrong keys)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=50)).eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, use_dora=True))
    stacked = fl.stack([_perturbed(lora, seed=1), _perturbed(lora, seed=2)])
    ids = torch.randint(0, 50, (4, 5))
    cache = DynamicCache(config=model.config)
    with pytest.raises(ValueError, match=r"an input holds a DynamicCache: every pass would write its rows into that one "
                                         r"KV cache.*use_cache=False"):
        lora.route(stacked, [0, 1, 0, 1], input_ids=ids, cache=cache, use_cache=True)
    assert cache.get_seq_length() == 0                    # refused before any pass wrote into it
    with torch.no_grad():                                 # one adapter: a single pass may use the cache
        lora.route(stacked, [1, 1, 1, 1], input_ids=ids, cache=cache, use_cache=True)
    assert cache.get_seq_length() == 5
