"""funclora.core.suggest: roles of a model's linear layers and target_modules entries, on hand-made models."""

import re

import pytest
from torch import nn

import funclora as fl
from conftest import assert_unchanged, snapshot
from funclora.core._kinds import name_match
from funclora.core.suggest import ROLES, LayerGroup, TargetSuggestion, suggest_targets


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 4)
        self.v_proj, self.o_proj = nn.Linear(8, 4), nn.Linear(8, 8)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = Attention(), MLP()


class Llama(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(8, 10)


class _Dense(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.dense = nn.Linear(i, o)


class BertSelf(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)


class BertAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self, self.output = BertSelf(), _Dense(8, 8)


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.intermediate, self.output = BertAttention(), _Dense(8, 16), _Dense(16, 8)


class Bert(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(), BertLayer()])
        self.pooler = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 2)


def _matched(entries, model) -> list[str]:
    """The module paths a ``target_modules`` value matches under PEFT's rule."""
    return [n for n, _ in model.named_modules() if n and name_match(n, entries)]


# --- roles ------------------------------------------------------------------------------------
def test_roles_of_a_llama_like_model():
    model = Llama()
    before = snapshot(model)
    s = suggest_targets(model)
    assert_unchanged(before, model)
    assert s.roles == {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],
                       "mlp": ["gate_proj", "up_proj", "down_proj"], "head": ["lm_head"]}
    assert s.attention == {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"]}
    assert s.mlp == ["gate_proj", "up_proj", "down_proj"] and s.head == ["lm_head"] and s.other == []
    assert s.target_modules == ["q_proj", "v_proj"] and s.model_type is None
    assert s.groups[1] == LayerGroup("k_proj", "k", ("layers.0.self_attn.k_proj", "layers.1.self_attn.k_proj"),
                                     "Linear", (8, 4))
    assert s.groups[-1] == LayerGroup("lm_head", "head", ("lm_head",), "Linear", (8, 10))
    assert [g.role for g in s.groups] == ["q", "k", "v", "o", "mlp", "mlp", "mlp", "head"]


def test_printed_table():
    s = suggest_targets(Llama())
    assert str(s.groups[0]) == (
        "'q_proj'                       2 × Linear 8→8  e.g. layers.0.self_attn.q_proj … layers.1.self_attn.q_proj")
    assert str(s.groups[-1]) == "'lm_head'                      1 × Linear 8→10  e.g. lm_head"
    lines = str(s).splitlines()
    assert [line for line in lines if not line.startswith("    ")] == [
        "  attention query (q):", "  attention key (k):", "  attention value (v):", "  attention output (o):",
        "  MLP (mlp):", "  output head (head):", "  suggested: target_modules=['q_proj', 'v_proj']"]
    assert len(lines) == 15


def test_bert_like_model_needs_a_regex_for_the_mlp_output():
    model = Bert()
    s = suggest_targets(model)
    assert s.roles == {"q": ["query"], "k": ["key"], "v": ["value"], "o": ["attention.output.dense"],
                       "mlp": ["intermediate.dense", r"layer\.\d+\.output\.dense"], "head": ["classifier"],
                       "other": ["pooler"]}
    rx = next(g for g in s.groups if g.regex)
    assert rx.role == "mlp" and rx.paths == ("layer.0.output.dense", "layer.1.output.dense")
    assert "regex 'layer\\\\.\\\\d+\\\\.output\\\\.dense'" in str(rx)
    # 'output.dense' would also match the attention output: each entry matches exactly its group
    for g in s.groups:
        if g.regex:
            hit = [n for n, _ in model.named_modules() if re.fullmatch(g.entry, n)]
        else:
            hit = _matched([g.entry], model)
        assert hit == list(g.paths), g


def test_fused_projections_are_qkv():
    class Attn(nn.Module):
        def __init__(self, fused):
            super().__init__()
            setattr(self, fused, nn.Linear(8, 24))
            self.proj = nn.Linear(8, 8)

    model = nn.Module()
    model.blocks = nn.ModuleList([Attn(n) for n in ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack",
                                                    "q_k_v")])
    model.enc = nn.ModuleList([nn.Module()])
    model.enc[0].kv_proj = nn.Linear(8, 16)                  # a fused k/v projection
    s = suggest_targets(model)
    assert s.roles["qkv"] == ["qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack", "q_k_v", "kv_proj"]
    # the other linear beside a fused projection is the attention output
    assert s.roles == {"qkv": s.roles["qkv"], "o": ["proj"]} and len(s.groups[-1].paths) == 6
    assert s.target_modules == s.roles["qkv"]


def test_in_proj_is_fused_only_inside_an_attention_module():
    model = nn.Module()
    model.attention = nn.Module()
    model.attention.in_proj = nn.Linear(4, 12)
    model.stem = nn.Module()
    model.stem.in_proj = nn.Linear(4, 4)
    s = suggest_targets(model)
    assert s.roles == {"qkv": ["attention.in_proj"], "other": ["stem.in_proj"]}


def test_multihead_attention_is_one_qkv_layer_and_hides_its_out_proj():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module(), nn.Module()])
    for block in model.blocks:
        block.mha, block.ff = nn.MultiheadAttention(8, 2), nn.Linear(8, 8)
    s = suggest_targets(model)
    assert s.groups[0] == LayerGroup("mha", "qkv", ("blocks.0.mha", "blocks.1.mha"), "MultiheadAttention", (8, 24))
    assert s.roles == {"qkv": ["mha"], "mlp": ["ff"]}
    assert not any("out_proj" in p for g in s.groups for p in g.paths)
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=s.target_modules, r=2))
    assert lora.targeted_module_names == ["blocks.0.mha", "blocks.1.mha"]


def test_output_role_by_parent_name_or_sibling():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].attn = nn.ModuleDict({"dense": nn.Linear(4, 4)})          # parent named *attn*
    model.layers[0].mixer = nn.ModuleDict({"wq": nn.Linear(4, 4), "out": nn.Linear(4, 4)})   # sibling of wq
    model.layers[0].ffn = nn.ModuleDict({"out": nn.Linear(4, 4)})
    s = suggest_targets(model)
    assert s.roles == {"q": ["wq"], "o": ["dense", "mixer.out"], "mlp": ["ffn.out"]}


def test_head_names_count_only_at_the_top_outside_blocks():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].classifier = nn.Linear(4, 4)        # inside a numbered block: an MLP layer
    model.score = nn.Linear(4, 2)
    model.proj = nn.Linear(4, 4)
    s = suggest_targets(model)
    assert s.roles == {"mlp": ["classifier"], "head": ["score"], "other": ["proj"]}
    assert s.target_modules == ["classifier", "proj"]   # every linear outside the head


def test_a_pretrained_models_output_embeddings_are_its_head():
    class PreTrainedModel(nn.Module):   # suggest recognises transformers models by this class name
        pass

    class Config:
        model_type = "toy"

    class Toy(PreTrainedModel):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.to_vocab = nn.Linear(8, 10)
            self.classifier = nn.Linear(8, 2)   # not a head: the model names its own

        def get_output_embeddings(self):
            return self.to_vocab

    s = suggest_targets(Toy())
    assert s.roles == {"head": ["to_vocab"], "other": ["classifier"]}
    assert s.model_type == "toy"
    assert s.target_modules == ["classifier"]


def test_transformers_conv1d_kind_and_shape():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = nn.Module()
    model.h = nn.ModuleList([nn.Module(), nn.Module()])
    for block in model.h:
        block.attn = nn.Module()
        block.attn.c_attn, block.attn.c_proj = Conv1D(24, 8), Conv1D(8, 8)   # weight (in, out)
        block.mlp = nn.Module()
        block.mlp.c_fc, block.mlp.c_proj = Conv1D(32, 8), Conv1D(8, 32)
    s = suggest_targets(model)
    assert s.roles == {"qkv": ["c_attn"], "o": ["attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"]}
    assert [(g.kind, g.shape) for g in s.groups] == [("Conv1D", (8, 24)), ("Conv1D", (8, 8)),
                                                     ("Conv1D", (8, 32)), ("Conv1D", (32, 8))]


def test_entries_use_the_shortest_suffix_with_a_name():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module(), nn.Module()])
    for block in model.blocks:
        block.ff = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    s = suggest_targets(model)
    assert s.mlp == ["ff.0", "ff.2"]                   # 'ff.0', not the bare '0'
    assert _matched(s.mlp, model) == ["blocks.0.ff.0", "blocks.0.ff.2", "blocks.1.ff.0", "blocks.1.ff.2"]


def test_a_plain_sequential_is_other_and_suggested_whole():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    s = suggest_targets(model)
    assert s.roles == {"other": ["0", "2"]} and s.target_modules == ["0", "2"]


def test_suggestion_falls_back_role_by_role():
    only_o = nn.Module()
    only_o.attn = nn.ModuleDict({"out_proj": nn.Linear(4, 4)})
    assert suggest_targets(only_o).target_modules == ["out_proj"]
    only_head = nn.Module()
    only_head.lm_head = nn.Linear(4, 4)
    assert suggest_targets(only_head).target_modules == ["lm_head"]
    none = suggest_targets(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Embedding(3, 2)))
    assert none == TargetSuggestion((), None, None)
    assert str(none) == "no nn.Linear / Conv1D layers" and none.roles == {}


# --- entries() --------------------------------------------------------------------------------
def test_entries_of_roles():
    model = Llama()
    s = suggest_targets(model)
    assert s.entries("q", "k", "v", "o") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert s.entries("mlp") == ["gate_proj", "up_proj", "down_proj"]
    assert s.entries("v", "q") == ["q_proj", "v_proj"]        # the groups' order, not the arguments'
    assert s.entries("qkv") == [] and s.entries() == []
    assert _matched(s.entries("o", "head"), model) == ["layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj",
                                                       "lm_head"]


def test_entries_become_one_regex_when_a_group_needs_one():
    model = Bert()
    s = suggest_targets(model)
    combined = s.entries("o", "mlp")
    assert combined == (r"(?:(?:.*\.)?attention\.output\.dense|(?:.*\.)?intermediate\.dense"
                        r"|layer\.\d+\.output\.dense)")
    assert _matched(combined, model) == [f"layer.{i}.{p}" for i in (0, 1) for p in
                                         ("attention.output.dense", "intermediate.dense", "output.dense")]
    assert s.entries("q", "v") == ["query", "value"]


def test_entries_refuse_unknown_roles():
    with pytest.raises(ValueError) as info:
        suggest_targets(Llama()).entries("q", "query", "ffn")
    assert str(info.value) == (f"TargetSuggestion.entries: unknown roles ['query', 'ffn']; roles are {list(ROLES)}.")
