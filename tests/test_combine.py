"""``lora.combine``: mixing adapters with "linear", "cat" and "svd" (funclora/multi/combine.py)."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funclora as fl
from funclora.demo import MLP

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5, 4))         # (E, d1, d2): a stack of experts

    def forward(self, x):                                   # x (B, 4)
        return torch.einsum("edk,bk->bed", self.w, x).sum(1)


class Zoo(nn.Module):
    """One of each layer type combine knows."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 4)
        self.lin = nn.Linear(4, 4)
        self.conv = nn.Conv2d(2, 3, 3)
        self.conv1 = nn.Conv1d(2, 3, 2)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.experts = Experts()
        self.lstm = nn.LSTM(4, 3, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, ids, img):                            # ids (B, T), img (B, 2, 5, 5)
        h = self.lin(self.emb(ids))
        h, _ = self.mha(h, h, h)
        h, _ = self.lstm(h)
        e = self.experts(h.mean(1).repeat(1, 2)[:, :4])
        c = self.conv(img).mean((2, 3))                     # (B, 3)
        c1 = self.conv1(img.mean(3)).mean(2)                # (B, 3)
        return self.head(torch.cat([e[:, :3] + c + c1, h[:, -1, :2]], 1))


def _zoo(**kw):
    torch.manual_seed(0)
    model = Zoo().eval()
    cfg = fl.LoraConfig(target_modules=["emb", "lin", "conv", "conv1", "mha"],
                        target_parameters=["experts.w", "lstm.weight_ih_l0"], modules_to_save=["head"],
                        r=2, lora_alpha=3, init_lora_weights=False, **kw)
    return model, fl.LoRA(model, cfg)


def _adapters(lora, n, seed=0):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        a = lora.init(generator=g)
        for path, leaves in a.items():
            for leaf, t in leaves.items():
                leaves[leaf] = t + 0.3 * torch.randn(t.shape, generator=g)
        out.append(a)
    return out


def _want(lora, adapters, weights):
    deltas = [lora.delta(a) for a in adapters]
    return {k: sum(w * d[k] for w, d in zip(weights, deltas)) for k in deltas[0]}


def _matrices(name, delta):
    """The matrices whose rank LoRA bounds: per expert for a 3-D stack, kernels flattened."""
    if name == "experts.w":
        return list(delta)
    return [delta.reshape(delta.shape[0], -1)]


weights_st = st.lists(st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=1, max_size=3)


# --- laws ---------------------------------------------------------------------------------------
@SETTINGS
@given(weights=weights_st)
def test_cat_is_the_weighted_sum_of_deltas_exactly(weights):
    model, lora = _zoo()
    adapters = _adapters(lora, len(weights))
    mixed, config = lora.combine(adapters, weights, method="cat")
    new = fl.LoRA(model, config)
    assert config.r == 2 * len(weights) and all(t.scaling == 1.0 for t in new.plan.targets.values())
    got, want = new.delta(mixed), _want(lora, adapters, weights)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


@SETTINGS
@given(weights=weights_st)
def test_svd_at_full_rank_is_the_weighted_sum(weights):
    model, lora = _zoo()
    adapters = _adapters(lora, len(weights))
    mixed, config = lora.combine(adapters, weights, method="svd", rank=2 * len(weights))
    got, want = fl.LoRA(model, config).delta(mixed), _want(lora, adapters, weights)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)


@SETTINGS
@given(weights=weights_st.filter(lambda w: len(w) > 1), k=st.integers(1, 3))
def test_svd_below_full_rank_is_the_best_approximation(weights, k):
    model, lora = _zoo()
    adapters = _adapters(lora, len(weights))
    mixed, config = lora.combine(adapters, weights, method="svd", rank=k)
    assert config.r == k and config.lora_alpha == k
    got, want = fl.LoRA(model, config).delta(mixed), _want(lora, adapters, weights)
    for name in want:
        for g, d in zip(_matrices(name, got[name]), _matrices(name, want[name])):
            s = torch.linalg.svdvals(d.double())
            # Eckart–Young: the best rank-k error is the tail of the singular values
            best = s[k:].square().sum().sqrt()
            err = torch.linalg.matrix_norm((g - d).double())
            assert err <= best + 1e-4 * (1 + s[0]), (name, float(err), float(best))
            assert torch.linalg.matrix_rank(g.double(), atol=1e-5 * (1 + float(s[0]))) <= k
            u, sv, vh = torch.linalg.svd(d.double())
            if len(sv) > k and sv[k - 1] - sv[k] > 1e-3 * sv[0]:     # unique optimum: compare directly
                torch.testing.assert_close(g.double(), (u[:, :k] * sv[:k]) @ vh[:k], atol=1e-4, rtol=1e-4)


def test_linear_is_peft_formula_and_exact_for_one_adapter():
    model, lora = _zoo()
    (a,) = _adapters(lora, 1)
    mixed, config = lora.combine([a], [-0.7], method="linear")
    assert config.r == 2
    got, want = fl.LoRA(model, config).delta(mixed), _want(lora, [a], [-0.7])
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    # two adapters: A = Σ sign(c)√|c| A_i, B = Σ √|c| B_i with c = w·s (s = 3/2)
    a1, a2 = _adapters(lora, 2, seed=5)
    mixed, _ = lora.combine([a1, a2], [0.5, -2.0], method="linear")
    c1, c2 = 0.5 * 1.5, -2.0 * 1.5
    A = math.sqrt(c1) * a1["lin"]["lora_A"] - math.sqrt(-c2) * a2["lin"]["lora_A"]
    B = math.sqrt(c1) * a1["lin"]["lora_B"] + math.sqrt(-c2) * a2["lin"]["lora_B"]
    torch.testing.assert_close(mixed["lin"]["lora_A"], A)
    torch.testing.assert_close(mixed["lin"]["lora_B"], B)


def test_saved_modules_mix_as_task_vectors():
    model, lora = _zoo()
    adapters = _adapters(lora, 2)
    mixed, _ = lora.combine(adapters, [0.25, 0.5], method="cat")
    base = model.head.weight.detach()
    want = base + 0.25 * (adapters[0]["head"]["weight"] - base) + 0.5 * (adapters[1]["head"]["weight"] - base)
    torch.testing.assert_close(mixed["head"]["weight"], want)


def test_combined_adapter_runs_and_equals_merged_weights():
    model, lora = _zoo()
    adapters = _adapters(lora, 3)
    weights = [0.5, 1.0, -0.25]
    mixed, config = lora.combine(fl.stack(adapters), weights, method="cat")    # a stack works too
    new = fl.LoRA(model, config)
    ids, img = torch.randint(0, 12, (2, 3)), torch.randn(2, 2, 5, 5)
    params = dict(model.named_parameters())
    for name, d in _want(lora, adapters, weights).items():
        params[name] = params[name] + d
    params["head.weight"] = mixed["head"]["weight"]
    params["head.bias"] = mixed["head"]["bias"]
    want = torch.func.functional_call(model, params, (ids, img))
    torch.testing.assert_close(new(mixed, ids, img), want, atol=1e-5, rtol=1e-5)


def test_rslora_source_gives_scaling_one_not_peft_overscaling():
    torch.manual_seed(1)
    model = MLP(16).eval()
    kw = dict(target_modules=["seq.0", "seq.2"], r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False)
    lora = fl.LoRA(model, fl.LoraConfig(**kw))
    adapters = _adapters(lora, 2)
    mixed, config = lora.combine(adapters, [1.0, 1.0], method="cat")
    assert config.use_rslora is False and config.r == config.lora_alpha == 8
    got, want = fl.LoRA(model, config).delta(mixed), _want(lora, adapters, [1.0, 1.0])
    torch.testing.assert_close(got["seq.2.weight"], want["seq.2.weight"], atol=1e-5, rtol=1e-5)
    # PEFT 0.21 keeps use_rslora, so its mix is √8 too large (PEFT_LORA_SEMANTICS §6.3, #3761)
    pm = _peft_model(model, kw, adapters)
    pm.add_weighted_adapter(["a0", "a1"], [1.0, 1.0], "mix", combination_type="cat")
    layer = pm.base_model.model.seq[2]
    assert layer.scaling["mix"] == pytest.approx(math.sqrt(8))
    torch.testing.assert_close(layer.get_delta_weight("mix"), math.sqrt(8) * want["seq.2.weight"], atol=1e-4, rtol=1e-4)


def test_rank_pattern_keeps_per_target_ranks():
    torch.manual_seed(2)
    model = MLP(16).eval()
    cfg = fl.LoraConfig(target_modules=["seq.0", "seq.2", "seq.4"], r=2, rank_pattern={"seq.2": 5},
                        alpha_pattern={"seq.4": 7}, init_lora_weights=False)
    lora = fl.LoRA(model, cfg)
    adapters = _adapters(lora, 3)
    for method, ranks in [("cat", (6, 15, 6)), ("linear", (2, 5, 2)), ("svd", (2, 5, 2))]:
        mixed, config = lora.combine(adapters, [0.2, 0.3, 0.5], method=method)
        again = fl.LoraConfig.from_dict(config.to_dict())                  # survives JSON
        for c in (config, again):
            new = fl.LoRA(model, c)
            assert tuple(new.plan.targets[p].r for p in ("seq.0", "seq.2", "seq.4")) == ranks
            assert all(t.scaling == 1.0 for t in new.plan.targets.values())
            new.check(mixed)
    mixed, config = lora.combine(adapters, [0.2, 0.3, 0.5], method="svd", rank=3)
    assert config.r == 3 and config.rank_pattern == {} and mixed["seq.2"]["lora_A"].shape == (3, 16)


def test_svd_rank_above_the_matrix_rank_pads_with_zeros():
    model, lora = _zoo()
    adapters = _adapters(lora, 2)
    mixed, config = lora.combine(adapters, [1.0, 0.5], method="svd", rank=6)   # lin is 4×4
    assert mixed["lin"]["lora_A"].shape == (6, 4)
    got, want = fl.LoRA(model, config).delta(mixed), _want(lora, adapters, [1.0, 0.5])
    torch.testing.assert_close(got["lin.weight"], want["lin.weight"], atol=1e-5, rtol=1e-5)


def test_dtype_is_kept():
    model, lora = _zoo()
    adapters = [{p: {k: v.to(torch.float64) for k, v in leaves.items()} for p, leaves in a.items()}
                for a in _adapters(lora, 2)]
    mixed, _ = lora.combine(adapters, [1.0, 1.0], method="svd")
    assert all(t.dtype == torch.float64 for leaves in mixed.values() for t in leaves.values())


# --- errors -------------------------------------------------------------------------------------
def test_combine_errors():
    model, lora = _zoo()
    a = _adapters(lora, 2)
    with pytest.raises(ValueError, match="unknown method 'ties'"):
        lora.combine(a, [1, 1], method="ties")
    with pytest.raises(ValueError, match="got 2 adapters but 3 weights"):
        lora.combine(a, [1, 1, 1], method="cat")
    with pytest.raises(ValueError, match="rank"):
        lora.combine(a, [1, 1], method="cat", rank=2)
    with pytest.raises(ValueError, match="rank"):
        lora.combine(a, [1, 1], method="svd", rank=0)
    with pytest.raises(ValueError, match="finite"):
        lora.combine(a, [1, float("nan")], method="svd")
    with pytest.raises(fl.AdapterMismatchError, match=r"adapters\[1\]"):
        lora.combine([a[0], {"lin": {}}], [1, 1])
    with pytest.raises(ValueError, match="no adapters"):
        lora.combine([], [])


def test_combine_refuses_grouped_conv_and_unknown_rules():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2))
    with pytest.raises(NotImplementedError, match="groups=2"):
        lora.combine([lora.init()], [1.0], method="cat")

    class Doubling(fl.rules.LinearRule):
        def delta(self, module, factors, scaling):
            return {"weight": 2 * scaling * factors["lora_B"] @ factors["lora_A"]}

    config = fl.LoraConfig(target_modules=["0"], r=2)
    config.register_custom_module({nn.Linear: Doubling()})
    lora = fl.LoRA(nn.Sequential(nn.Linear(3, 3)), config)
    with pytest.raises(NotImplementedError, match="whose update is not known to be B@A"):
        lora.combine([lora.init()], [1.0], method="cat")


# --- PEFT ---------------------------------------------------------------------------------------
def _peft_model(model, peft_kwargs, adapters):
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**peft_kwargs), adapter_name="a0")
    for i in range(1, len(adapters)):
        pm.add_adapter(f"a{i}", peft.LoraConfig(**peft_kwargs))
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            for path, leaves in adapter.items():
                module = pm.base_model.model.get_submodule(path)
                for leaf, t in leaves.items():
                    getattr(module, leaf)[f"a{i}"].weight.copy_(t)
    return pm.eval()


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_matches_peft_add_weighted_adapter(method):
    torch.manual_seed(3)
    model = MLP(16).eval()
    kw = dict(target_modules=["seq.0", "seq.2"], r=3, lora_alpha=5, init_lora_weights=False)
    lora = fl.LoRA(model, fl.LoraConfig(**kw))
    adapters = _adapters(lora, 3)
    weights = [0.6, -0.4, 1.1]
    pm = _peft_model(model, kw, adapters)
    pm.add_weighted_adapter(["a0", "a1", "a2"], weights, "mix", combination_type=method)
    mixed, config = lora.combine(adapters, weights, method=method)
    new = fl.LoRA(model, config)
    for path in ("seq.0", "seq.2"):
        layer = pm.base_model.model.get_submodule(path)
        assert layer.r["mix"] == new.plan.targets[path].r and layer.scaling["mix"] == 1.0
        if method != "svd":                          # same factors (up to the order of w·s products)
            torch.testing.assert_close(mixed[path]["lora_A"], layer.lora_A["mix"].weight, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(mixed[path]["lora_B"], layer.lora_B["mix"].weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(new.delta(mixed)[f"{path}.weight"], layer.get_delta_weight("mix"),
                                   atol=1e-5, rtol=1e-4)


def test_combined_adapter_saves_in_peft_format_and_loads_in_peft(tmp_path):
    save_adapter = getattr(fl, "save_adapter", None)
    if save_adapter is None:
        pytest.skip("funclora.save_adapter (funclora/io.py) is not available yet")
    torch.manual_seed(4)
    model = MLP(16).eval()
    cfg = fl.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], r=2, lora_alpha=4,
                        use_rslora=True, rank_pattern={"seq.2": 3}, init_lora_weights=False)
    lora = fl.LoRA(model, cfg)
    adapters = _adapters(lora, 3)
    mixed, config = lora.combine(adapters, [0.5, 0.3, 0.2], method="cat")
    new = fl.LoRA(model, config)
    save_adapter(tmp_path, mixed, lora=new)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    x = torch.randn(4, 20)
    torch.testing.assert_close(pm(x), new(mixed, x), atol=1e-5, rtol=1e-5)
    loaded, loaded_config = fl.load_adapter(tmp_path, model=model)
    torch.testing.assert_close(fl.LoRA(model, loaded_config)(loaded, x), new(mixed, x), atol=1e-6, rtol=1e-6)


def test_conv1d_and_embedding_of_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(5)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=30, n_positions=8,
                                       bos_token_id=0, eos_token_id=0)).eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["c_attn", "c_fc", "wte"], r=2, lora_alpha=4,
                                        init_lora_weights=False))
    adapters = _adapters(lora, 2)
    want = _want(lora, adapters, [0.5, -1.5])
    for method, rank in (("cat", None), ("svd", 4)):
        mixed, config = lora.combine(adapters, [0.5, -1.5], method=method, rank=rank)
        got = fl.LoRA(model, config).delta(mixed)
        for k in want:                                      # Conv1D deltas are stored (in, out)
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    ids = torch.randint(0, 30, (2, 5))
    new = fl.LoRA(model, config)
    params = dict(model.named_parameters())
    params.update({k: params[k] + d for k, d in want.items()})
    ref = torch.func.functional_call(model, params, (ids,), {"use_cache": False}, tie_weights=False).logits
    torch.testing.assert_close(new(mixed, ids, use_cache=False).logits, ref, atol=1e-4, rtol=1e-4)
