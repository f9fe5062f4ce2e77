"""transformers models through the functional call: outputs, keyword inputs, gradients and
greedy generation equal PEFT's with the same adapter values (fp32, ≤ 1e-5).

Families: see tiny_transformers.py. Each is built twice from the same seed-free copy (PEFT
gets a deep copy, since it mutates its model); the funclora adapter is random (0.02·randn) and
copied into PEFT's ``lora_A`` / ``lora_B`` parameters.
"""

import inspect

import pytest
import torch
from conftest import assert_unchanged, snapshot
from peft_reference import load_into_peft, peft_grads
from tiny_transformers import FAMILIES, NAMES, build, inputs, peft_default_targets, peft_model, random_adapter

import funclora as fl

TOL = dict(atol=1e-5, rtol=1e-5)
GENERATIVE = [n for n in NAMES if FAMILIES[n].kind != "encoder"]  # bert / roberta do not generate


def _pair(name, scale=0.02, **config):
    """(model, funclora LoRA, adapter, PEFT model holding the same adapter)."""
    model = build(name)
    lora = fl.LoRA(model, fl.LoraConfig(**config))
    adapter = random_adapter(lora, scale=scale)
    ref = peft_model(model, **config)
    load_into_peft(ref, adapter)
    return model, lora, adapter, ref


def _targets(name, which):
    if which == "default":
        return peft_default_targets(name) and None  # None: both look the family up in their table
    if which == "all-linear":
        return "all-linear"
    return fl.suggest_targets(build(name)).entries("q", "k", "v", "qkv", "o")  # an explicit list


CASES = [(n, w) for n in NAMES for w in ("default", "all-linear", "attention")
         if not (w == "default" and peft_default_targets(n) is None)]


@pytest.mark.parametrize("name,which", CASES)
def test_outputs_and_loss_equal_peft_with_keyword_inputs(name, which):
    model, lora, adapter, ref = _pair(name, target_modules=_targets(name, which))
    before = snapshot(model)
    x = inputs(name)  # input_ids, attention_mask (one padded row), labels (+ decoder_input_ids)
    ours, theirs, plain = lora(adapter, **x), ref(**x), model(**x)
    assert type(ours) is type(plain)  # the model's own output object
    torch.testing.assert_close(ours.logits, theirs.logits, **TOL)
    torch.testing.assert_close(ours.loss, theirs.loss, **TOL)
    assert not torch.allclose(ours.logits, plain.logits, atol=1e-4)  # the adapter acts
    assert_unchanged(before, model)


def test_phi3_explicit_lists_equal_peft():
    """phi3 has no default in PEFT 0.21.2's table: an explicit list (the suggested one and a
    wider one) gives the same targets and outputs as PEFT."""
    suggested = fl.suggest_targets(build("phi3")).target_modules
    assert suggested == ["qkv_proj"]
    for targets in (suggested, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]):
        model, lora, adapter, ref = _pair("phi3", target_modules=targets)
        assert lora.targeted_module_names == ref.targeted_module_names
        x = inputs("phi3")
        torch.testing.assert_close(lora(adapter, **x).logits, ref(**x).logits, **TOL)


@pytest.mark.parametrize("name", ["llama", "gpt2", "falcon", "bert", "t5", "bart"])
def test_gradients_equal_peft(name):
    model, lora, adapter, ref = _pair(name, target_modules="all-linear")
    x = inputs(name)
    grads = torch.func.grad(lambda a: lora(a, **x).loss)(adapter)
    ref(**x).loss.backward()
    expected = peft_grads(ref, adapter)
    for path, leaves in grads.items():
        for leaf, g in leaves.items():
            torch.testing.assert_close(g, expected[path][leaf], atol=1e-6, rtol=1e-4, msg=f"{path}.{leaf}")


def test_labels_alone_drive_an_encoder_decoder():
    """T5 / BART build decoder_input_ids from labels inside forward: that path works too."""
    for name in ("t5", "bart"):
        model, lora, adapter, ref = _pair(name)
        x = inputs(name)
        kw = dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=x["labels"])
        ours, theirs = lora(adapter, **kw), ref(**kw)
        torch.testing.assert_close(ours.loss, theirs.loss, **TOL)
        torch.testing.assert_close(ours.logits, theirs.logits, **TOL)


def test_other_keyword_options_pass_through():
    model, lora, adapter, ref = _pair("bart")
    x = inputs("bart")
    ours = lora(adapter, **x, output_hidden_states=True, output_attentions=True)
    theirs = ref(**x, output_hidden_states=True, output_attentions=True)
    assert len(ours.decoder_hidden_states) == len(theirs.decoder_hidden_states) == 3
    torch.testing.assert_close(ours.encoder_last_hidden_state, theirs.encoder_last_hidden_state, **TOL)
    torch.testing.assert_close(ours.cross_attentions[-1], theirs.cross_attentions[-1], **TOL)
    as_tuple = lora(adapter, **x, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], ours.logits, **TOL)  # (loss, logits, ...)


# --- greedy generation through the functional call --------------------------------------------------
def greedy(forward, name, ids, mask, steps):
    """A ``model.generate``-style greedy loop (no cache) around ``forward(**kwargs) -> output``."""
    if FAMILIES[name].kind == "seq2seq":
        start = build(name).config.decoder_start_token_id
        dec = torch.full((ids.shape[0], 1), start, dtype=torch.long)
        for _ in range(steps):
            logits = forward(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return dec[:, 1:]
    for _ in range(steps):
        logits = forward(input_ids=ids, attention_mask=mask).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, -steps:]


@pytest.mark.parametrize("name", GENERATIVE)
def test_greedy_generation_with_an_adapter_equals_peft(name):
    model, lora, adapter, ref = _pair(name, scale=0.3, target_modules="all-linear")  # big enough to
    x = inputs(name)                                                                 # change tokens
    ids, mask, steps = x["input_ids"], torch.ones_like(x["input_ids"]), 6
    with torch.no_grad():
        ours = greedy(lambda **kw: lora(adapter, **kw), name, ids, mask, steps)
        theirs = greedy(lambda **kw: ref(**kw), name, ids, mask, steps)
        plain = greedy(lambda **kw: model(**kw), name, ids, mask, steps)
        # no EOS: the loop above never stops early either
        generated = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                 eos_token_id=None, forced_eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, generated[:, -steps:])  # PEFT's own generate (with its KV cache)
    assert not torch.equal(ours, plain)  # the adapter changes what is generated


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_greedy_generation_with_a_kv_cache_through_the_functional_call(name):
    """The cache object passes through ``lora(adapter, ..., cache=cache)`` (``past_key_values``
    before transformers 5.x) and is filled by the model; the tokens equal the cache-free loop."""
    model = build(name)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    lora = fl.LoRA(model, fl.LoraConfig(target_modules="all-linear"))
    adapter = random_adapter(lora)
    ids, steps = inputs(name)["input_ids"], 5
    with torch.no_grad():
        expected = greedy(lambda **kw: lora(adapter, **kw), name, ids, torch.ones_like(ids), steps)
        out, tokens = None, []
        if FAMILIES[name].kind == "seq2seq":
            nxt = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id, dtype=torch.long)
            encoder_outputs = None
            for _ in range(steps):
                out = lora(adapter, input_ids=ids, encoder_outputs=encoder_outputs, decoder_input_ids=nxt,
                           use_cache=True, **{key: out[key] if out is not None else None})
                encoder_outputs = (out.encoder_last_hidden_state,)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
        else:
            nxt = ids
            for _ in range(steps):
                out = lora(adapter, input_ids=nxt, use_cache=True, **{key: out[key] if out is not None else None})
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
    assert torch.equal(torch.cat(tokens, dim=1), expected)


# --- torch.compile ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_compile_fullgraph_of_the_functional_forward_on_a_tiny_llama():
    model = build("llama")
    lora = fl.LoRA(model, fl.LoraConfig())
    adapter = random_adapter(lora)
    x = inputs("llama")

    def logits(a, ids, mask):
        return lora(a, input_ids=ids, attention_mask=mask).logits

    compiled = torch.compile(logits, fullgraph=True)
    torch.testing.assert_close(compiled(adapter, x["input_ids"], x["attention_mask"]),
                               logits(adapter, x["input_ids"], x["attention_mask"]), **TOL)
