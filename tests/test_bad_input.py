"""Fuzzed configs and adapter pytrees through the public entry points (docs/errors.md).

Valid input works; invalid input raises a funclora error (or the config's ValueError / TypeError)
whose message names the field or the adapter path; never another exception type, never a silent
result; the model is unchanged either way.
"""

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import funclora as fl
from conftest import assert_unchanged, random_adapter, snapshot

# field -> values to draw from, valid and invalid mixed
FIELDS = {
    "r": [2, 4, 0, -1, True, 2.5, "4"],
    "lora_alpha": [1, 8.5, float("nan"), float("inf"), "8", True],
    "lora_dropout": [0.0, 0.1, 1.5, "0.1", None, -0.1],
    "use_rslora": [False, True, "false", 1],
    "bias": ["none", "all", "lora_only", "some"],
    "target_modules": [["0"], ["0", "2"], "0|2", "[", 5, ["zz"]],
    "modules_to_save": [None, "2", ["2"], ["x["], 3],
    "init_lora_weights": [True, False, "gaussian", "bogus", 3],
    "task_type": [None, "CAUSAL_LM", "SEQ_CLASS"],
    "rank_pattern": [{}, {"0": 2}, {"0": True}, {"(": 2}, "0"],
    "alpha_pattern": [{}, {"2": 3}, {"2": float("nan")}, {"*": 3}],
    "layers_to_transform": [None, "1", [-1]],
}
CONFIG_ERRORS = (ValueError, TypeError)   # fl's error types are ValueError subclasses


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.filterwarnings("ignore:The following (alpha|rank)_pattern keys:RuntimeWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in FIELDS.items()}))
def test_fuzzed_configs(kwargs):
    kwargs.setdefault("target_modules", ["0"])
    model = _model()
    before = snapshot(model)
    try:
        config = fl.LoraConfig(**kwargs)
    except CONFIG_ERRORS as e:
        message = str(e)
        assert any(f"`{k}`" in message or f"{k}[" in message or k in message for k in kwargs) or \
            "initialization" in message or "task type" in message, message
        return
    try:
        lora = fl.LoRA(model, config)
    except (fl.TargetNotFoundError, fl.UnsupportedModuleError) as e:
        assert "LoRA:" in str(e)
        return
    adapter, x = lora.init(), torch.randn(3, 4)
    out = lora(adapter, x)
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    assert_unchanged(before, model)


def _mutations():
    """(name, mutate(adapter) -> adapter, valid?)"""
    def leaf(fn, path="0", name="lora_A"):
        def mutate(a):
            b = {p: dict(ls) for p, ls in a.items()}
            b[path][name] = fn(b[path][name])
            return b
        return mutate

    return [
        ("none", lambda a: a, True),
        ("both factors float64", lambda a: {**a, "0": {k: v.double() for k, v in a["0"].items()}}, True),
        ("missing path", lambda a: {p: v for p, v in a.items() if p != "0"}, False),
        ("extra path", lambda a: {**a, "9": dict(a["0"])}, False),
        ("missing leaf", lambda a: {**a, "0": {"lora_A": a["0"]["lora_A"]}}, False),
        ("leaves not a dict", lambda a: {**a, "0": [a["0"]["lora_A"]]}, False),
        ("list leaf", leaf(lambda t: t.tolist()), False),
        ("None leaf", leaf(lambda t: None), False),
        ("int leaf", leaf(lambda t: t.long()), False),
        ("bool leaf", leaf(lambda t: t > 0), False),
        ("complex leaf", leaf(lambda t: t.to(torch.complex64)), False),
        ("mixed factor dtypes", leaf(lambda t: t.double()), False),
        ("meta leaf", leaf(lambda t: t.to("meta")), False),
        ("wrong shape", leaf(lambda t: t[:1]), False),
        ("saved leaf meta", leaf(lambda t: t.to("meta"), "2", "weight"), False),
        ("saved leaf int", leaf(lambda t: t.long(), "2", "bias"), False),
    ]


ENTRIES = ["forward", "apply", "merge", "delta", "route", "facade", "save", "combine"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_mutations()), st.sampled_from(ENTRIES))
def test_fuzzed_adapters_at_every_entry_point(mutation, entry):
    name, mutate, valid = mutation
    model = _model()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], modules_to_save=["2"], r=2))
    adapter, x = mutate(random_adapter(lora)), torch.randn(3, 4)
    before = snapshot(model)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def run():
        if entry == "forward":
            return lora(adapter, x)
        if entry == "apply":
            return lora.apply(params, adapter, x)
        if entry == "merge":
            return lora.merge(adapter)
        if entry == "delta":
            return lora.delta(adapter)
        if entry == "route":
            return lora.route(fl.stack([adapter, adapter]), [0, 1, 1], x)
        if entry == "facade":
            return fl.PeftModel(model, lora.config, adapter)(x)
        if entry == "combine":
            return lora.combine([adapter, adapter], [0.5, 0.5], method="cat")
        with tempfile.TemporaryDirectory() as folder:
            return fl.save_adapter(folder, adapter, lora=lora)

    if valid:
        run()
    else:
        with pytest.raises((fl.AdapterMismatchError, TypeError, ValueError)) as info:
            run()
        message = str(info.value)
        assert any(f"'{p}'" in message for p in ("0", "2", "9")) or "module paths" in message, (name, message)
    assert_unchanged(before, model)
