"""Adapter files against real PEFT 0.21.2: funclora → PEFT and PEFT → funclora, per layer type.

Every test runs with warnings as errors, so PEFT's "Found missing adapter keys" (or any other
warning while loading) fails it. MultiheadAttention: PEFT 0.21.2 applies the out_proj delta twice
(PEFT_LORA_SEMANTICS.md §2.5, PR #3774); funclora applies it once, so the MHA comparisons use an
adapter with out_proj's B doubled on the funclora side, and the files are compared exactly.
"""

import copy
import json
import os

import pytest
import torch
from io_models import (EmbNet, ConvNet, GPT2ish, Layers, MHANet, MLP, ParamNet, build, doubled_out_proj,
                       peft_model, random_adapter)

import funclora as fl

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

CASES = {
    "mlp_modules_to_save": (MLP, dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])),
    "mlp_bias_all_patterns": (MLP, dict(target_modules=["seq.0", "seq.2"], r=4, lora_alpha=16, bias="all",
                                        use_rslora=True, rank_pattern={"seq.2": 2}, alpha_pattern={"seq.0": 3})),
    "mlp_bias_lora_only": (MLP, dict(target_modules=["seq.0", "seq.4"], r=2, bias="lora_only")),
    "conv": (ConvNet, dict(target_modules=["conv1", "conv2", "c1", "c3"], r=4, modules_to_save=["fc"])),
    "embedding": (EmbNet, dict(target_modules=["emb", "out"], r=4, lora_alpha=8)),
    "conv1d_transformers": (GPT2ish, dict(target_modules=["c_attn", "c_proj"], r=4, fan_in_fan_out=True)),
    "mha": (MHANet, dict(target_modules=["mha", "fc"], r=2, bias="all")),
    "target_parameters": (ParamNet, dict(target_modules=["fc"], r=2, bias="all", target_parameters=[
        "raw.w1", "w2", "lstm.weight_ih_l0", "lstm.weight_hh_l0"])),
    "condensed_24_targets": (Layers, dict(target_modules=[f"layers.{i}.{k}" for i in range(12) for k in "qv"], r=2)),
}
MAX_DIFF: dict[str, float] = {}  # filled by the tests, printed by test_report_numbers


def _forward(lora, adapter, cls):
    needs_double = any("out_proj.lora_B" in leaves for leaves in adapter.values())
    return lora(doubled_out_proj(adapter) if needs_double else adapter, *cls.inputs())


@pytest.mark.parametrize("case", list(CASES))
def test_funclora_file_loads_in_peft(tmp_path, case):
    cls, kw = CASES[case]
    model = build(cls)
    lora = fl.LoRA(model, fl.LoraConfig(**kw))
    adapter = random_adapter(lora)
    fl.save_adapter(tmp_path, adapter, lora=lora)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    # what PEFT holds is exactly what the file holds, under the same keys PEFT itself writes
    file = load_file(str(tmp_path / "adapter_model.safetensors"))
    state = peft.get_peft_model_state_dict(pm)
    assert set(state) == set(file)
    for k, t in file.items():
        assert torch.equal(state[k], t), k
    peft_file = tmp_path / "peft"
    pm.save_pretrained(str(peft_file))
    assert set(load_file(str(peft_file / "adapter_model.safetensors"))) == set(file)
    with torch.no_grad():
        diff = (pm(*cls.inputs()) - _forward(lora, adapter, cls)).abs().max().item()
    MAX_DIFF[f"funclora->peft {case}"] = diff
    assert diff <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_funclora(tmp_path, case):
    cls, kw = CASES[case]
    model = build(cls)
    pm = peft_model(model, kw)
    pm.save_pretrained(str(tmp_path))
    adapter, config = fl.load_adapter(tmp_path, model=model)
    lora = fl.LoRA(model, config)
    assert list(adapter) == list(lora.init())
    with torch.no_grad():
        diff = (pm(*cls.inputs()) - _forward(lora, adapter, cls)).abs().max().item()
    MAX_DIFF[f"peft->funclora {case}"] = diff
    assert diff <= 1e-5
    if case == "target_parameters":  # two parameters of `raw` (and of `lstm`) nest: needs the model
        with pytest.raises(fl.AdapterMismatchError, match="Pass model="):
            fl.load_adapter(tmp_path)
        return
    bare, _ = fl.load_adapter(tmp_path)
    assert {p: set(v) for p, v in bare.items()} == {p: set(v) for p, v in adapter.items()}
    for p, leaves in adapter.items():
        for leaf, t in leaves.items():
            assert torch.equal(bare[p][leaf], t), (p, leaf)


@pytest.mark.parametrize("file_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_folder_in_another_dtype_loads_as_peft_loads_it(tmp_path, file_dtype):
    """fp16 / bf16 / fp64 files (factors and a saved head) onto an fp32 model: PEFT copies them into
    its fp32 parameters; funclora's leaves get init()'s dtypes, so the forward runs and equals PEFT's."""
    cls, kw = CASES["mlp_modules_to_save"]
    model = build(cls)
    lora = fl.LoRA(model, fl.LoraConfig(**kw))
    adapter = {p: {k: t.to(file_dtype) for k, t in leaves.items()} for p, leaves in random_adapter(lora).items()}
    fl.save_adapter(tmp_path, adapter, lora.config)
    loaded, _ = fl.load_adapter(tmp_path, model=model)
    assert {t.dtype for leaves in loaded.values() for t in leaves.values()} == {torch.float32}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        diff = (pm(*cls.inputs()) - lora(loaded, *cls.inputs())).abs().max().item()
    assert diff <= 1e-5
    assert fl.load_adapter(tmp_path, model=model, dtype=file_dtype)[0]["seq.0"]["lora_A"].dtype == file_dtype


def test_condensed_target_list_is_read(tmp_path):
    cls, kw = CASES["condensed_24_targets"]
    peft_model(build(cls), kw).save_pretrained(str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        assert sorted(json.load(f)["target_modules"]) == ["q", "v"]  # PEFT rewrote 24 names to 2 suffixes
    adapter, config = fl.load_adapter(tmp_path, model=build(cls))
    assert len(adapter) == 24 and sorted(config.target_modules) == ["q", "v"]


def test_facade_save_and_load_match_peft(tmp_path):
    model = build(MLP)
    config = fl.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], r=4)
    ours = fl.get_peft_model(model, config, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    x = MLP.inputs()[0]
    assert (ours.eval()(x) - theirs(x)).abs().max() <= 1e-5
    back = fl.PeftModel.from_pretrained(model, tmp_path)
    assert (back(x) - theirs(x)).abs().max() <= 1e-5
    assert not any(p.requires_grad for p in back.parameters())


def test_named_adapters_from_peft(tmp_path):
    model = build(MLP)
    pm = peft_model(model, dict(target_modules=["seq.0", "seq.2"], r=4))
    pm.add_adapter("second", peft.LoraConfig(target_modules=["seq.2"], r=2, modules_to_save=["seq.4"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".second." in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "second" / "adapter_config.json")
    adapters, configs = fl.load_adapters(tmp_path, model=model)
    assert list(adapters) == ["default", "second"] and configs["second"].r == 2
    second, _ = fl.load_adapter(tmp_path, adapter_name="second", model=model)
    x = MLP.inputs()[0]
    for name in ("default", "second"):
        pm.set_adapter(name)
        lora = fl.LoRA(model, configs[name])
        assert (lora(adapters[name], x) - pm(x)).abs().max() <= 1e-5
    assert all(torch.equal(second[p][k], adapters["second"][p][k]) for p in second for k in second[p])
    peft_sub = fl.PeftModel.from_pretrained(model, tmp_path, subfolder="second")
    assert (peft_sub(x) - pm(x)).abs().max() <= 1e-5


def test_named_adapters_to_peft(tmp_path):
    model = build(MLP)
    c1 = fl.LoraConfig(target_modules=["seq.0"], r=4)
    c2 = fl.LoraConfig(target_modules=["seq.2"], r=2, modules_to_save=["seq.4"])
    a1, a2 = random_adapter(fl.LoRA(model, c1), 1), random_adapter(fl.LoRA(model, c2), 2)
    fl.save_adapter(tmp_path, {"default": a1, "other": a2}, {"default": c1, "other": c2}, model=model)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    pm.load_adapter(str(tmp_path / "other"), adapter_name="other")
    x = MLP.inputs()[0]
    assert (pm(x) - fl.LoRA(model, c1)(a1, x)).abs().max() <= 1e-5
    pm.set_adapter("other")
    assert (pm(x) - fl.LoRA(model, c2)(a2, x)).abs().max() <= 1e-5


def test_overlapping_rank_pattern_survives_the_file(tmp_path):
    # {"q": 2, "layers.0.q": 6}: the first match wins, so layers.0.q has r=2; PEFT's sorted JSON
    # would put "layers.0.q" first (r=6). funclora writes anchored per-module entries instead.
    model = build(lambda: Layers(2))
    kw = dict(target_modules=["q"], r=4, rank_pattern={"q": 2, "layers.0.q": 6})
    with pytest.warns(RuntimeWarning, match="layers.0.q"):  # shadowed by "q"
        lora = fl.LoRA(model, fl.LoraConfig(**kw))
    assert lora.plan.targets["layers.0.q"].r == 2
    adapter = random_adapter(lora)
    fl.save_adapter(tmp_path, adapter, lora=lora)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    assert pm.base_model.model.layers[0]["q"].r["default"] == 2
    x = Layers.inputs()[0]
    assert (pm(x) - lora(adapter, x)).abs().max() <= 1e-5
    # PEFT's own file of the same config cannot be read back with the right ranks (by PEFT either)
    peft_dir = tmp_path / "peft"
    peft_model(model, kw).save_pretrained(str(peft_dir))
    with pytest.raises(fl.AdapterMismatchError,
                       match=r"layers\.0\.q\.lora_A\.weight.*\(2, 4\).*\(6, 4\).*rank_pattern"):
        fl.load_adapter(peft_dir, model=model)


def test_unknown_newer_config_keys_warn_once(tmp_path):
    model = build(MLP)
    peft_model(model, dict(target_modules=["seq.0"])).save_pretrained(str(tmp_path))
    file = tmp_path / "adapter_config.json"
    data = json.loads(file.read_text())
    data["a_future_option"] = {"x": 1}
    file.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="a_future_option") as record:
        adapter, _ = fl.load_adapter(tmp_path, model=model)
    assert len(record) == 1 and set(adapter) == {"seq.0"}


def test_conv1d_config_says_fan_in_fan_out(tmp_path):
    model = build(GPT2ish)
    fl.save_adapter(tmp_path, random_adapter(fl.LoRA(model, fl.LoraConfig(target_modules=["c_attn"]))),
                    fl.LoraConfig(target_modules=["c_attn"]), model=model)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["fan_in_fan_out"] is True and data["inference_mode"] is True and data["peft_type"] == "LORA"


def test_all_linear_is_written_as_the_resolved_list(tmp_path):
    model = build(MLP)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules="all-linear"))
    adapter = random_adapter(lora)
    fl.save_adapter(tmp_path, adapter, lora=lora)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["seq.0", "seq.2", "seq.4"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    x = MLP.inputs()[0]
    assert (pm(x) - lora(adapter, x)).abs().max() <= 1e-5


# PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` (third-party noise)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_tiny_gpt2_all_linear_both_ways(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules="all-linear", r=4, task_type="CAUSAL_LM"))
    adapter = random_adapter(lora)
    fl.save_adapter(tmp_path, adapter, lora=lora)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        diff = (pm(input_ids=ids).logits - lora(adapter, input_ids=ids).logits).abs().max().item()
    MAX_DIFF["funclora->peft tiny GPT-2 all-linear"] = diff
    assert diff <= 1e-5
    peft_dir = tmp_path / "peft"
    pm.save_pretrained(str(peft_dir))
    back, config = fl.load_adapter(peft_dir, model=model)
    with torch.no_grad():
        diff = (pm(input_ids=ids).logits - fl.LoRA(model, config)(back, input_ids=ids).logits).abs().max().item()
    MAX_DIFF["peft->funclora tiny GPT-2 all-linear"] = diff
    assert diff <= 1e-5


def test_zz_report_numbers():
    """Not a check: prints the measured max |PEFT − funclora| per case (run with -s to see them)."""
    for k, v in sorted(MAX_DIFF.items()):
        print(f"{k:45s} {v:.3g}")
