"""Tied weights (input embedding ↔ lm_head sharing one Parameter): an adapter on one never leaks
into the other, as in PEFT; merge / unmerge / explicit params dicts on tied models.

See the module docstring of funclora/lora.py for the rules these tests pin.
"""

import pytest
import torch
from conftest import assert_unchanged, snapshot
from peft_reference import load_into_peft
from tiny_transformers import build, inputs, peft_model, random_adapter

import funclora as fl

TOL = dict(atol=1e-5, rtol=1e-5)


def _tied_names(model):
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _setup(name, scale=0.05, **config):
    model = build(name)
    assert _tied_names(model), f"{name} should tie its embedding and head"
    lora = fl.LoRA(model, fl.LoraConfig(**config))
    adapter = random_adapter(lora, scale=scale)
    return model, lora, adapter


CASES = [
    ("gemma", dict(target_modules=["embed_tokens"])),
    ("gpt2", dict(target_modules=["wte"])),
    ("opt", dict(target_modules=["embed_tokens", "q_proj"])),
    ("bart", dict(target_modules=["embed_tokens"])),  # encoder's and decoder's share `shared`
    ("t5", dict(target_modules=["shared"])),
    ("bert", dict(target_modules=["word_embeddings"])),
    ("gpt2", dict(target_modules=["lm_head"])),
    ("gemma", dict(target_modules=["embed_tokens", "lm_head"])),
    ("gemma", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    ("gpt2", dict(target_modules=["c_attn"], modules_to_save=["lm_head"])),
]


@pytest.mark.parametrize("name,config", CASES, ids=[f"{n}-{'+'.join(c['target_modules'] + c.get('modules_to_save', []))}"
                                                    for n, c in CASES])
def test_adapting_a_tied_weight_equals_peft(name, config):
    model, lora, adapter = _setup(name, **config)
    ref = peft_model(model, **config)
    load_into_peft(ref, adapter)
    before = snapshot(model)
    x = inputs(name)
    ours = lora(adapter, **x)
    torch.testing.assert_close(ours.logits, ref(**x).logits, **TOL)
    assert_unchanged(before, model)  # still tied, still W
    assert _tied_names(model)


def test_an_embedding_adapter_does_not_reach_the_tied_head():
    """Directly: the logits equal the hidden states (computed with the adapter) times the
    plain embedding matrix, not the adapted one."""
    model, lora, adapter = _setup("gpt2", target_modules=["wte"])
    x = inputs("gpt2")
    out = lora(adapter, input_ids=x["input_ids"], output_hidden_states=True)
    W = model.transformer.wte.weight
    torch.testing.assert_close(out.logits, out.hidden_states[-1] @ W.T, **TOL)
    # ...and the embedding lookup itself is adapted
    delta = lora.delta(adapter)["transformer.wte.weight"]
    assert delta.abs().max() > 0


def test_a_head_adapter_does_not_reach_the_tied_embedding():
    model, lora, adapter = _setup("gemma", target_modules=["lm_head"])
    x = inputs("gemma")
    base = model(**x, output_hidden_states=True)
    ours = lora(adapter, **x, output_hidden_states=True)
    for h0, h1 in zip(base.hidden_states, ours.hidden_states):  # the trunk is untouched
        torch.testing.assert_close(h0, h1, atol=0, rtol=0)
    assert not torch.allclose(base.logits, ours.logits, atol=1e-4)


@pytest.mark.parametrize("name,targets,adapted,twin", [
    ("gemma", ["embed_tokens"], "model.embed_tokens.weight", "lm_head.weight"),
    ("gpt2", ["lm_head"], "lm_head.weight", "transformer.wte.weight"),
])
def test_merge_spells_out_tied_twins_and_equals_the_adapter_forward(name, targets, adapted, twin):
    model, lora, adapter = _setup(name, target_modules=targets)
    x = inputs(name)
    merged = lora.merge(adapter)
    W = model.get_parameter(adapted)
    assert merged[twin] is W  # the twin keeps the base weight...
    torch.testing.assert_close(merged[adapted], W + lora.delta(adapter)[adapted], **TOL)  # ...only this moves
    expected = lora(adapter, **x).logits
    got = torch.func.functional_call(model, merged, (), x, tie_weights=False).logits
    torch.testing.assert_close(got, expected, **TOL)
    # torch's default tie_weights=True refuses two values for one tied Parameter, loudly
    with pytest.raises(ValueError, match="which are tied"):
        torch.func.functional_call(model, merged, (), x)


def test_unmerge_gives_back_the_tied_form():
    model, lora, adapter = _setup("gemma", target_modules=["embed_tokens", "q_proj"])
    params = dict(model.named_parameters())
    unmerged = lora.unmerge(lora.merge(adapter), adapter)
    assert set(unmerged) == set(params)  # one entry per tied group again
    for name, value in params.items():
        torch.testing.assert_close(unmerged[name], value, atol=1e-6, rtol=0)
    x = inputs("gemma")
    torch.testing.assert_close(torch.func.functional_call(model, unmerged, (), x).logits, model(**x).logits,
                               atol=1e-5, rtol=1e-5)


def test_peft_merge_leaks_into_the_tied_head_funclora_merge_does_not():
    """PEFT 0.21.2's merge_adapter writes ΔW into the shared Parameter, so its tied lm_head
    changes too and its merged output differs from its unmerged one (PEFT warns; issue #2777).
    funclora's merged params keep the twin at W: merged output == adapter output == PEFT's
    unmerged output."""
    model, lora, adapter = _setup("gemma", target_modules=["embed_tokens"])
    ref = peft_model(model, target_modules=["embed_tokens"])
    load_into_peft(ref, adapter)
    x = inputs("gemma")
    peft_unmerged = ref(**x).logits
    with pytest.warns(UserWarning, match="tie_word_embeddings=True"):  # PEFT's own warning
        ref.merge_adapter()
    peft_merged = ref(**x).logits
    assert not torch.allclose(peft_merged, peft_unmerged, atol=1e-4)  # PEFT's leak
    ours = torch.func.functional_call(model, lora.merge(adapter), (), x, tie_weights=False).logits
    torch.testing.assert_close(ours, peft_unmerged, **TOL)


def test_explicit_params_name_a_tied_weight_once_and_the_twin_follows():
    model, lora, adapter = _setup("gpt2", target_modules=["c_attn"])
    x = inputs("gpt2")
    params = dict(model.named_parameters())  # lists the tied weight once, as transformer.wte.weight
    assert "lm_head.weight" not in params
    torch.testing.assert_close(lora.apply(params, adapter, **x).logits, lora(adapter, **x).logits, atol=0, rtol=0)
    # a new value for the shared weight reaches both the embedding and the head, as in the model
    params = dict(params, **{"transformer.wte.weight": 1.5 * params["transformer.wte.weight"]})
    zero = {p: {k: torch.zeros_like(v) for k, v in leaves.items()} for p, leaves in adapter.items()}
    expected = torch.func.functional_call(model, params, (), x).logits  # tie_weights=True
    torch.testing.assert_close(lora.apply(params, zero, **x).logits, expected, **TOL)


def test_explicit_params_with_an_adapted_tied_embedding_still_keep_the_head_at_w():
    model, lora, adapter = _setup("gpt2", target_modules=["wte"])
    x = inputs("gpt2")
    params = dict(model.named_parameters())
    torch.testing.assert_close(lora.apply(params, adapter, **x).logits, lora(adapter, **x).logits, atol=0, rtol=0)


def test_facade_merge_and_unload_unties_the_adapted_weight():
    model = build("gemma")
    before = snapshot(model)
    peft_model_ = fl.get_peft_model(model, fl.LoraConfig(target_modules=["embed_tokens"]))
    lora = peft_model_.lora
    with torch.no_grad():
        for path, leaves in random_adapter(lora, scale=0.05).items():
            for leaf, value in leaves.items():
                peft_model_.adapter[path][leaf].copy_(value)
    x = inputs("gemma")
    expected = peft_model_(**x).logits
    merged = peft_model_.merge_and_unload()
    torch.testing.assert_close(merged(**x).logits, expected, **TOL)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight  # untied in the copy
    torch.testing.assert_close(merged.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)
    assert_unchanged(before, model)


def test_ensure_weight_tying_is_rejected():
    """PEFT's opt-in that would adapt the twin too is not implemented: the config says so."""
    with pytest.raises(ValueError, match="ensure_weight_tying=True"):
        fl.LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True)
