"""Which layers funclora targets on transformers models, and ``fl.suggest_targets``.

Families (tiny random-init configs, see tiny_transformers.py): llama, mistral, qwen2, gemma,
phi3, gpt2, gpt_neox, opt, bloom, falcon, bert, roberta, t5, bart. A family missing from the
installed transformers is skipped, and the skip says so.
"""

import re

import pytest
import torch
from conftest import assert_unchanged, snapshot
from tiny_transformers import NAMES, build, peft_default_targets, peft_model

import funclora as fl
from funclora.core import suggest
from funclora.core._kinds import is_linear as _is_linear

IN_PEFT_TABLE = [n for n in NAMES if peft_default_targets(n) is not None]


@pytest.mark.parametrize("name", IN_PEFT_TABLE)
def test_default_targets_equal_peft(name):
    model = build(name)
    lora = fl.LoRA(model, fl.LoraConfig())
    ref = peft_model(model)
    assert lora.targeted_module_names == ref.targeted_module_names
    assert lora.targeted_module_names  # something was targeted


@pytest.mark.parametrize("name", NAMES)
def test_all_linear_equals_peft(name):
    model = build(name)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules="all-linear"))
    ref = peft_model(model, target_modules="all-linear")
    assert lora.targeted_module_names == ref.targeted_module_names
    head = model.get_output_embeddings()
    head_names = [n for n, m in model.named_modules() if m is head]
    assert head_names and not set(head_names) & set(lora.targeted_module_names)
    linear = [n for n, m in model.named_modules() if n and _is_linear(m) and n not in head_names]
    assert lora.targeted_module_names == linear


def test_phi3_has_no_default_in_peft_and_both_raise():
    model = build("phi3")
    assert peft_default_targets("phi3") is None
    with pytest.raises(ValueError, match="Please specify `target_modules` or `target_parameters`"):
        peft_model(model)
    with pytest.raises(fl.TargetNotFoundError, match="Please specify `target_modules` or `target_parameters`"):
        fl.LoRA(model, fl.LoraConfig())


def test_unknown_model_type_error_lists_layers_by_role_attention_first_and_suggests():
    model = build("phi3")
    before = snapshot(model)
    with pytest.raises(fl.TargetNotFoundError) as info:
        fl.LoRA(model, fl.LoraConfig())
    assert_unchanged(before, model)
    msg = str(info.value)
    assert "model_type 'phi3' has no default targets" in msg
    assert "target_modules=['qkv_proj']" in msg
    order = [msg.index(f"'{entry}'") for entry in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")]
    assert order == sorted(order), msg  # attention projections first, then MLP, then the head
    assert msg.index("attention fused q/k/v") < msg.index("attention output") < msg.index("MLP") \
        < msg.index("output head")
    assert "model.layers.0.self_attn.qkv_proj" in msg  # the layer names themselves


def test_unknown_model_error_on_a_plain_module_suggests_its_linear_layers():
    from funclora.demo import MLP

    with pytest.raises(fl.TargetNotFoundError, match=r"MLP is not a transformers model") as info:
        fl.LoRA(MLP(8), fl.LoraConfig())
    assert "target_modules=['seq.0', 'seq.2', 'seq.4']" in str(info.value)  # the seed guide's names
    assert "seq.0" in str(info.value)


def test_unknown_model_error_without_linear_layers_says_so():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    with pytest.raises(fl.TargetNotFoundError, match="no nn.Linear / Conv1D layer") as info:
        fl.LoRA(model, fl.LoraConfig())
    assert "target_parameters" in str(info.value)


# --- suggest_targets ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IN_PEFT_TABLE)
def test_suggestion_equals_peft_default_for_every_family_peft_knows(name):
    """The analysis, blind to the table, lands on PEFT's choice for each known family."""
    got = fl.suggest_targets(build(name)).target_modules
    assert sorted(got) == sorted(peft_default_targets(name))


def _list_match(entry, names):
    return {n for n in names if n == entry or n.endswith("." + entry)}


@pytest.mark.parametrize("name", NAMES)
def test_each_group_entry_matches_exactly_its_layers_and_every_linear_once(name):
    model = build(name)
    names = [n for n, _ in model.named_modules() if n]
    s = fl.suggest_targets(model)
    seen = []
    for g in s.groups:
        hit = {n for n in names if re.fullmatch(g.entry, n)} if g.regex else _list_match(g.entry, names)
        assert hit == set(g.paths), g
        seen += g.paths
    linear = [n for n, m in model.named_modules() if n and _is_linear(m)]
    assert sorted(seen) == sorted(linear)
    roles = [g.role for g in s.groups]
    assert roles == sorted(roles, key=suggest.ROLES.index)  # attention first, then mlp, head, other


@pytest.mark.parametrize("name", NAMES)
def test_entries_target_exactly_the_roles_layers(name):
    model = build(name)
    s = fl.suggest_targets(model)
    for role in ("q", "v", "qkv", "o", "mlp"):
        paths = [p for g in s.groups if g.role == role for p in g.paths]
        if not paths:
            continue
        lora = fl.LoRA(model, fl.LoraConfig(target_modules=s.entries(role)))
        assert sorted(lora.targeted_module_names) == sorted(paths), role


def test_roles_of_a_llama():
    s = fl.suggest_targets(build("llama"))
    assert s.roles == {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],
                       "mlp": ["gate_proj", "up_proj", "down_proj"], "head": ["lm_head"]}
    assert s.attention == {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"]}
    assert s.model_type == "llama"
    assert s.entries("q", "k", "v", "o") == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_roles_of_gpt2_tell_the_two_c_proj_apart():
    s = fl.suggest_targets(build("gpt2"))
    assert s.roles == {"qkv": ["c_attn"], "o": ["attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"], "head": ["lm_head"]}
    assert {g.kind for g in s.groups if g.role != "head"} == {"Conv1D"}
    assert next(g for g in s.groups if g.entry == "c_attn").shape == (32, 96)


def test_roles_of_bert_use_a_regex_where_no_suffix_separates_the_layers():
    s = fl.suggest_targets(build("bert"))
    assert s.attention == {"q": ["query"], "k": ["key"], "v": ["value"], "o": ["attention.output.dense"]}
    mlp = {g.entry: g for g in s.groups if g.role == "mlp"}
    # 'output.dense' would also match 'attention.output.dense': the entry becomes a regex
    assert mlp["intermediate.dense"].regex is False
    rx = next(g for g in mlp.values() if g.regex)
    assert rx.paths == ("bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense")
    assert s.head == ["decoder"] and s.other == ["transform.dense"]
    combined = s.entries("o", "mlp")
    assert isinstance(combined, str)  # one regex for suffixes and regexes together
    lora = fl.LoRA(build("bert"), fl.LoraConfig(target_modules=combined))
    assert len(lora.targeted_module_names) == 6


def test_a_classifier_without_output_embeddings_is_the_head():
    import transformers
    from tiny_transformers import make_config

    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(make_config("bert"))
    assert fl.suggest_targets(model).head == ["classifier"]


def test_t5_groups_self_and_cross_attention_under_one_entry():
    s = fl.suggest_targets(build("t5"))
    q = next(g for g in s.groups if g.role == "q")
    assert q.entry == "q" and len(q.paths) == 6
    assert any("EncDecAttention" in p for p in q.paths)
    assert s.mlp == ["wi", "wo"] and s.target_modules == ["q", "v"]


def test_suggestion_on_a_custom_model_no_table_knows():
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(8, 8) for _ in range(3))
            self.to_out = torch.nn.Linear(8, 8)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = Attention()  # no "attn" in the name: roles come from the names inside
            self.ff = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))

    model = torch.nn.Module()
    model.proj_in = torch.nn.Linear(4, 8)
    model.blocks = torch.nn.ModuleList([Block(), Block()])
    model.head = torch.nn.Linear(8, 3)
    before = snapshot(model)
    s = fl.suggest_targets(model)
    assert_unchanged(before, model)
    assert s.roles == {"q": ["to_q"], "k": ["to_k"], "v": ["to_v"], "o": ["to_out"],
                       "mlp": ["ff.0", "ff.2"], "head": ["head"], "other": ["proj_in"]}
    assert s.target_modules == ["to_q", "to_v"] and s.model_type is None
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=s.target_modules))
    assert lora.targeted_module_names == ["blocks.0.mixer.to_q", "blocks.0.mixer.to_v",
                                          "blocks.1.mixer.to_q", "blocks.1.mixer.to_v"]
    text = str(s)
    assert text.index("attention query") < text.index("MLP") < text.index("output head") < text.index("other")
    assert "suggested: target_modules=['to_q', 'to_v']" in text


def test_suggestion_on_a_model_without_linear_layers_is_empty():
    s = fl.suggest_targets(torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3)))
    assert s.groups == () and s.target_modules is None and s.roles == {}
    assert str(s) == "no nn.Linear / Conv1D layers"


def test_entries_rejects_unknown_roles():
    with pytest.raises(ValueError, match=r"TargetSuggestion.entries: unknown roles \['query'\]"):
        fl.suggest_targets(build("llama")).entries("query")


def test_all_linear_with_seq_cls_excludes_the_classifier_like_peft():
    """No output embeddings on a sequence classifier: PEFT drops `classifier` from all-linear
    when task_type is SEQ_CLS (and saves it whole instead)."""
    import transformers
    from tiny_transformers import make_config

    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(make_config("bert")).eval()
    for task_type in (None, "SEQ_CLS"):
        lora = fl.LoRA(model, fl.LoraConfig(target_modules="all-linear", task_type=task_type))
        ref = peft_model(model, target_modules="all-linear", task_type=task_type)
        assert lora.targeted_module_names == ref.targeted_module_names
        assert ("classifier" in lora.targeted_module_names) == (task_type is None)
        assert ("classifier" in lora.plan.saved) == (task_type == "SEQ_CLS")


def test_multihead_attention_is_one_fused_target_and_its_out_proj_is_not_listed():
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    s = fl.suggest_targets(model)
    assert s.roles == {"qkv": ["self_attn"], "mlp": ["linear1", "linear2"]}
    assert next(g for g in s.groups if g.role == "qkv").shape == (16, 48)
    assert s.target_modules == ["self_attn"]
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=s.target_modules))
    assert lora.targeted_module_names == ["layers.0.self_attn", "layers.1.self_attn"]
