"""Same adapter values in funclora and PEFT give the same outputs, gradients and merged weights."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import funclora as fl
from conftest import random_adapter
from peft_reference import peft_grads, peft_twin

TOL = dict(atol=1e-5, rtol=1e-5)


class ConvNet(nn.Module):
    def __init__(self, dim=2):
        super().__init__()
        Conv = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
        self.conv1 = Conv(3, 8, 3, stride=2, padding=1)
        self.conv2 = Conv(8, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        return self.head(h.flatten(2).mean(-1))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.out = nn.Linear(16, 50)

    def forward(self, ids):
        return self.out(self.emb(ids))


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)).eval()


def _tiny_llama(kind="llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return model_cls(cfg).eval()


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)),
               dict(target_modules=["0", "2"], r=4, lora_alpha=8), lambda: torch.randn(5, 10)),
    "linear_mts_rslora": (lambda: nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)),
                          dict(target_modules=["0"], modules_to_save=["2"], r=4, lora_alpha=8, use_rslora=True),
                          lambda: torch.randn(5, 10)),
    "conv1d": (lambda: ConvNet(1), dict(target_modules=["conv1", "conv2"], r=4), lambda: torch.randn(2, 3, 12)),
    "conv2d": (lambda: ConvNet(2), dict(target_modules=["conv1", "conv2", "head"], r=4, lora_alpha=16),
               lambda: torch.randn(2, 3, 9, 9)),
    "embedding": (EmbedNet, dict(target_modules=["emb", "out"], r=4), lambda: torch.randint(0, 50, (3, 7))),
    "gpt2_conv1d": (_tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, fan_in_fan_out=True),
                    lambda: torch.randint(0, 64, (2, 9))),
    "llama": (_tiny_llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], r=4),
              lambda: torch.randint(0, 64, (2, 9))),
    "mistral": (lambda: _tiny_llama("mistral"), dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16),
                lambda: torch.randint(0, 64, (2, 9))),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _setup(name):
    make_model, kwargs, make_input = CASES[name]
    model = make_model()
    torch.manual_seed(1)
    x = make_input()
    lora = fl.LoRA(model, fl.LoraConfig(**kwargs))
    adapter = random_adapter(lora, scale=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own fan_in_fan_out / Conv1D notices
        ref = peft_twin(model, kwargs, adapter)
    return model, lora, adapter, ref, x


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_equal_peft(name):
    model, lora, adapter, ref, x = _setup(name)
    with torch.no_grad():
        torch.testing.assert_close(_logits(lora(adapter, x)), _logits(ref(x)), **TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_equal_peft(name):
    model, lora, adapter, ref, x = _setup(name)
    leaves = {p: {k: v.clone().requires_grad_() for k, v in d.items()} for p, d in adapter.items()}
    _logits(lora(leaves, x)).square().mean().backward()
    _logits(ref(x)).square().mean().backward()
    theirs = peft_grads(ref, adapter)
    for p, d in leaves.items():
        for k, v in d.items():
            torch.testing.assert_close(v.grad, theirs[p][k], atol=1e-5, rtol=1e-4, msg=f"{p}.{k}")


@pytest.mark.parametrize("name", list(CASES))
def test_merged_weights_equal_peft(name):
    model, lora, adapter, ref, x = _setup(name)
    merged = lora.merge(adapter)
    with torch.no_grad():
        theirs = dict(ref.merge_and_unload().named_parameters())
    for key, value in theirs.items():
        torch.testing.assert_close(merged[key], value, **TOL, msg=key)
    assert set(merged) == set(theirs)


def test_output_parity_numbers_are_tight():
    """Record the worst fp32 difference over all cases (reported in the issue's closing note)."""
    worst = 0.0
    for name in CASES:
        model, lora, adapter, ref, x = _setup(name)
        with torch.no_grad():
            worst = max(worst, (_logits(lora(adapter, x)) - _logits(ref(x))).abs().max().item())
    assert worst <= 1e-5
