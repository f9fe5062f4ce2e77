"""Every example of the seed guide (PEFT's "Custom models" page), with funclora and its exact numbers."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import funclora as fl
from funclora import LoraConfig, get_peft_model


class MLP(nn.Module):
    """Verbatim from the seed guide."""

    def __init__(self, num_units_hidden=2000):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, X):
        return self.seq(X)


def test_mlp(capsys):
    config = LoraConfig(
        target_modules=["seq.0", "seq.2"],
        modules_to_save=["seq.4"],
    )
    model = MLP()
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 52,162 || all params: 4,100,164 || trainable%: 1.2722\n"
    assert peft_model.targeted_module_names == ["seq.0", "seq.2"]
    assert [n for n, _ in model.named_modules()] == ["", "seq", "seq.0", "seq.1", "seq.2", "seq.3", "seq.4", "seq.5"]
    assert isinstance(model.seq[0], nn.Linear)  # the model was not rewritten


def test_timm_poolformer(capsys):
    timm = pytest.importorskip("timm")
    model = timm.create_model("poolformer_m36", pretrained=False, num_classes=3)
    config = LoraConfig(target_modules=r".*\.mlp\.fc\d", modules_to_save=["head.fc"])
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 1,062,147 || all params: 56,467,974 || trainable%: 1.8810\n"
    targets = peft_model.lora.plan.targets.values()
    assert len(targets) == 72 and all(isinstance(t.module, nn.Conv2d) for t in targets)
    x = torch.randn(1, 3, 64, 64)
    model.eval(), peft_model.eval()
    with torch.no_grad(), fl.strict():
        torch.testing.assert_close(peft_model(x), model(x))  # fresh adapter: same output, factored convs


def _tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()


def test_new_transformers_architecture(capsys):
    my_mistral_model = _tiny_mistral()
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16)
    peft_model = get_peft_model(my_mistral_model, config)
    peft_model.print_trainable_parameters()
    ours = capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(my_mistral_model), peft.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                                                   r=8, lora_alpha=16))
    ref.print_trainable_parameters()
    assert ours == capsys.readouterr().out
    assert peft_model.targeted_module_names == ref.targeted_module_names == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    # target_modules=None uses the default table, which for mistral is the same choice
    assert fl.LoRA(my_mistral_model, LoraConfig()).targeted_module_names == peft_model.targeted_module_names


class LSTMModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class MyLoraLSTMLayer(fl.Rule):
    """A user rule: LoRA on the input-hidden and hidden-hidden weights of layer 0 (all four gates)."""

    def factors(self, module, r):
        return {f"{w}.{ab}": fl.Factor((r, getattr(module, w).shape[1]) if ab == "lora_A"
                                       else (getattr(module, w).shape[0], r), ab[-1])
                for w in ("weight_ih_l0", "weight_hh_l0") for ab in ("lora_A", "lora_B")}

    def updated_parameters(self, module):
        return ("weight_ih_l0", "weight_hh_l0")

    def delta(self, module, factors, scaling):
        return {w: scaling * factors[f"{w}.lora_B"] @ factors[f"{w}.lora_A"] for w in self.updated_parameters(module)}


def test_unsupported_lstm_then_target_parameters_then_a_user_rule():
    base_model = LSTMModel()
    x = torch.randn(3, 5, 4)
    with pytest.raises(fl.UnsupportedModuleError, match="'lstm' is a torch.nn.modules.rnn.LSTM"):
        get_peft_model(base_model, LoraConfig(target_modules=["lstm"]))

    by_params = fl.LoRA(base_model, LoraConfig(target_parameters=["lstm.weight_ih_l0", "lstm.weight_hh_l0"]))
    adapter = {p: {k: 0.1 * torch.randn_like(v) for k, v in d.items()} for p, d in by_params.init().items()}
    torch.testing.assert_close(by_params(adapter, x), torch.func.functional_call(base_model, by_params.merge(adapter), (x,)))

    config = LoraConfig(target_modules=["lstm"])
    custom_module_mapping = {nn.LSTM: MyLoraLSTMLayer}
    config._register_custom_module(custom_module_mapping)
    peft_model = get_peft_model(base_model, config)
    assert peft_model.targeted_module_names == ["lstm"]
    optimizer = torch.optim.Adam(peft_model.parameters(), lr=0.05)
    y = torch.tensor([0, 1, 1])
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(peft_model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged(x), peft_model(x))
