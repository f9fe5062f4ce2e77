"""The seed guide's last section, end to end: nn.LSTM is not supported out of the box, a user rule
for it is registered, trained through get_peft_model, saved, and loaded in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import funclora as fl
from funclora.testing import check_rule

TESTS = os.path.dirname(os.path.abspath(__file__))


class LSTMRule(fl.Rule):
    """LoRA on every weight matrix of an nn.LSTM: all four gates, all layers, both directions.

    ``weight_ih_l{k}`` is ``(4·hidden, in)`` and ``weight_hh_l{k}`` ``(4·hidden, hidden)`` (gates
    i, f, g, o stacked as rows); each gets ``lora_A (r, in)`` / ``lora_B (4·hidden, r)``.
    """

    def updated_parameters(self, module):
        return tuple(n for n, p in module.named_parameters() if p.dim() == 2)

    def factors(self, module, r):
        out = {}
        for name in self.updated_parameters(module):
            rows, cols = module.get_parameter(name).shape
            out[f"{name}.lora_A"] = fl.Factor((r, cols), "A")
            out[f"{name}.lora_B"] = fl.Factor((rows, r), "B")
        return out

    def delta(self, module, factors, scaling):
        return {name: scaling * (factors[f"{name}.lora_B"] @ factors[f"{name}.lora_A"])
                for name in self.updated_parameters(module)}


class Tagger(nn.Module):
    """Token ids ``(batch, time)`` → tag logits ``(batch, time, 3)`` through a 2-layer LSTM."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0])


def make_model():
    torch.manual_seed(0)
    return Tagger()


def sample_ids():
    return torch.randint(0, 12, (16, 7), generator=torch.Generator().manual_seed(1))


def test_lstm_by_module_name_is_unsupported_with_a_clear_error():
    with pytest.raises(fl.UnsupportedModuleError) as info:
        fl.get_peft_model(make_model(), fl.LoraConfig(target_modules=["lstm"]))
    message = str(info.value)
    assert "'lstm' is a torch.nn.modules.rnn.LSTM" in message and "has no LoRA rule" in message
    assert "config.register_custom_module({LSTM: MyRule()})" in message
    assert "target_parameters=['lstm.<param>']" in message


def test_the_lstm_rule_keeps_the_laws():
    report = check_rule(lambda: nn.LSTM(8, 16, num_layers=2), LSTMRule())
    assert set(report.skipped) == {"vmap over a stack equals the loop"}  # PyTorch cannot vmap an LSTM
    assert "merge equals apply" in report.checked and "save/load round-trips" in report.checked


def _config():
    config = fl.LoraConfig(target_modules=["lstm"], r=4, lora_alpha=8)
    config._register_custom_module({nn.LSTM: LSTMRule})  # the seed's code: a class, PEFT's private name
    return config


def _train(peft_model, steps=25):
    ids = sample_ids()
    tags = ids % 3
    optimizer = torch.optim.Adam(peft_model.parameters(), lr=2e-2)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(peft_model(ids).reshape(-1, 3), tags.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_registered_rule_trains_through_get_peft_model(capsys):
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = fl.get_peft_model(model, _config(), generator=torch.Generator().manual_seed(0))
    assert peft_model.targeted_module_names == ["lstm"]
    peft_model.print_trainable_parameters()
    # A: 4·8 + 3·4·16 = 224, B: 4 weights · 64·4 = 1024
    assert capsys.readouterr().out.startswith("trainable params: 1,248 || all params: ")
    torch.testing.assert_close(peft_model(sample_ids()), model(sample_ids()))  # fresh: a no-op
    losses = _train(peft_model)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_vmap_over_lstm_adapters_points_to_route_and_route_works():
    model = make_model()
    lora = fl.LoRA(model, _config())
    adapters = []
    for seed in range(3):
        adapter = lora.init(generator=torch.Generator().manual_seed(seed))
        adapters.append({p: {k: v + 0.05 for k, v in leaves.items()} for p, leaves in adapter.items()})
    stacked, ids = fl.stack(adapters), sample_ids()[:4]
    with pytest.raises(RuntimeError, match=r"cannot run this model: it contains LSTM at \['lstm'\].*lora\.route"):
        torch.func.vmap(lora, in_dims=(0, None))(stacked, ids)
    index = torch.tensor([2, 0, 1, 2])
    routed = lora.route(stacked, index, ids)
    for i, j in enumerate(index.tolist()):
        torch.testing.assert_close(routed[i], lora(adapters[j], ids[i:i + 1])[0], atol=1e-6, rtol=1e-6)


# --- save, then load in a fresh process ------------------------------------------------------------
_FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn as nn
    from safetensors.torch import save_file
    import funclora as fl

    folder, out_file, tests, threads = sys.argv[1:5]
    torch.set_num_threads(int(threads))
    report = {}
    # 1. without the rule: the saved rule class cannot be imported here -> a clear error
    try:
        bare = nn.Module()
        bare.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        fl.PeftModel.from_pretrained(bare, folder)
    except Exception as e:
        report["without_rule"] = f"{type(e).__name__}: {e}"
    sys.path.insert(0, tests)
    from test_lstm_story import LSTMRule, make_model, sample_ids

    # 2. the seed's way: re-register on the loaded config, pass it to from_pretrained
    config = fl.LoraConfig.from_pretrained(folder)
    config._register_custom_module({nn.LSTM: LSTMRule})
    explicit = fl.PeftModel.from_pretrained(make_model(), folder, config=config)
    # 3. automatic: the file names the rule class, which is importable now
    automatic = fl.PeftModel.from_pretrained(make_model(), folder)
    ids = sample_ids()
    save_file({"explicit": explicit(ids).detach().contiguous(), "automatic": automatic(ids).detach().contiguous()},
              out_file)
    json.dump(report, sys.stdout)
""")


def test_save_and_reload_in_a_fresh_process_gives_the_same_outputs(tmp_path):
    model = make_model()
    peft_model = fl.get_peft_model(model, _config(), generator=torch.Generator().manual_seed(0))
    _train(peft_model, steps=5)
    peft_model.eval()
    expected = peft_model(sample_ids()).detach()
    folder = tmp_path / "lora-custom-module"
    peft_model.save_pretrained(folder)

    with open(folder / "adapter_config.json") as f:
        assert json.load(f)["target_modules"] == ["lstm"]
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {f"base_model.model.lstm.weight_{k}_l{layer}.lora_{x}.weight"
                    for k in ("ih", "hh") for layer in (0, 1) for x in "AB"}

    out_file = tmp_path / "outputs.safetensors"
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(folder), str(out_file), TESTS,
                           str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["without_rule"].startswith("UnsupportedModuleError: load_adapter: ")
    assert "register_custom_module" in report["without_rule"] and "LSTMRule" in report["without_rule"], report
    outputs = load_file(str(out_file))
    torch.testing.assert_close(outputs["explicit"], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outputs["automatic"], expected, atol=1e-6, rtol=1e-6)
