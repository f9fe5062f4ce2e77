"""DoRA through funclora's public API (``LoraConfig(use_dora=True)``) against PEFT 0.21.2.

The adapter gets one more leaf per target, ``"lora_magnitude_vector"``, with PEFT's shape:
``(out,)`` for Linear / transformers Conv1D, ``(embedding_dim,)`` for Embedding,
``(1, out, 1, …)`` for convs; in files it is ``base_model.model.<path>.lora_magnitude_vector``
(no ``.weight``), in PEFT's memory ``….lora_magnitude_vector.default.weight``.
The pure math (and PEFT's own layers) is tested in test_dora_math.py; docs/dora.md has the facts.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import funclora as fl


peft = pytest.importorskip("peft")

TOL = dict(atol=1e-5, rtol=1e-5)
MAG = "lora_magnitude_vector"


# --- models ---------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    def __init__(self, dim=2, groups=1):
        super().__init__()
        Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.conv1 = Conv(4, 8, 3, padding=1)
        self.conv2 = Conv(8, 8, 3, stride=2, groups=groups)
        self.conv3 = Conv(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.head(h.flatten(2).mean(-1))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12, padding_idx=0)
        self.out = nn.Linear(12, 30)

    def forward(self, ids):
        return self.out(self.emb(ids))


def _mlp():
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=12,
                                      bos_token_id=0, eos_token_id=0)).eval()


CASES = {
    "linear": (_mlp, dict(target_modules=["0", "2"], r=4, lora_alpha=8), lambda: torch.randn(5, 10)),
    "linear_rslora": (_mlp, dict(target_modules=["0"], r=4, lora_alpha=8, use_rslora=True, modules_to_save=["2"]),
                      lambda: torch.randn(5, 10)),
    "gpt2_conv1d": (_tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, fan_in_fan_out=True),
                    lambda: torch.randint(0, 40, (2, 7))),
    "embedding": (EmbedNet, dict(target_modules=["emb", "out"], r=4), lambda: torch.randint(0, 30, (3, 6))),
    "conv1d": (lambda: ConvNet(1), dict(target_modules=["conv1", "conv2", "conv3"], r=4), lambda: torch.randn(2, 4, 11)),
    "conv2d": (lambda: ConvNet(2), dict(target_modules=["conv1", "conv2", "conv3", "head"], r=4, lora_alpha=16),
               lambda: torch.randn(2, 4, 7, 7)),
    "conv3d": (lambda: ConvNet(3), dict(target_modules=["conv1", "conv3"], r=2), lambda: torch.randn(1, 4, 5, 5, 5)),
    "conv2d_grouped": (lambda: ConvNet(2, groups=4), dict(target_modules=["conv1", "conv2"], r=4),
                       lambda: torch.randn(2, 4, 7, 7)),
}
GROUPED = {"conv2d_grouped"}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _dora_adapter(lora, seed=0):
    """Every leaf non-trivial: A and B random, the magnitude the init times (1 ± 0.2)."""
    g = torch.Generator().manual_seed(seed)
    fresh = lora.init(generator=g)
    out = {}
    for path, leaves in fresh.items():
        out[path] = {}
        for leaf, v in leaves.items():
            if leaf == MAG:
                out[path][leaf] = v * (1 + 0.2 * torch.randn(v.shape, generator=g))
            elif leaf.startswith("lora_"):
                out[path][leaf] = 0.2 * torch.randn(v.shape, generator=g)
            else:
                out[path][leaf] = v + 0.1 * torch.randn(v.shape, generator=g)
    return out


def _peft_key(path, leaf):
    prefix = f"base_model.model.{path}"
    if leaf == MAG:
        return f"{prefix}.{MAG}.default.weight"
    if leaf in ("lora_A", "lora_B"):
        return f"{prefix}.{leaf}.default.weight"
    if leaf in ("lora_embedding_A", "lora_embedding_B"):
        return f"{prefix}.{leaf}.default"
    return f"{prefix}.modules_to_save.default.{leaf}"


def _peft_twin(model, kwargs, adapter=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out / groups > 1 notices
        twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(use_dora=True, **kwargs))
    if adapter is not None:
        params = dict(twin.named_parameters())
        with torch.no_grad():
            for path, leaves in adapter.items():
                for leaf, value in leaves.items():
                    params[_peft_key(path, leaf)].copy_(value)
    return twin


def _setup(name, seed=0):
    make, kwargs, make_x = CASES[name]
    torch.manual_seed(seed)
    model = make().eval()
    x = make_x()
    lora = fl.LoRA(model, fl.LoraConfig(use_dora=True, **kwargs))
    adapter = _dora_adapter(lora, seed=seed + 1)
    return model, kwargs, lora, adapter, _peft_twin(model, kwargs, adapter).eval(), x


# --- structure and init ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_leaves_have_peft_names_shapes_and_init(name):
    make, kwargs, _ = CASES[name]
    torch.manual_seed(0)
    model = make()
    lora = fl.LoRA(model, fl.LoraConfig(use_dora=True, **kwargs))
    twin = _peft_twin(model, kwargs)
    theirs = dict(twin.named_parameters())
    fresh = lora.init(generator=torch.Generator().manual_seed(0))
    for path in lora.targeted_module_names:
        assert MAG in fresh[path], path
        want = theirs[_peft_key(path, MAG)]
        assert tuple(fresh[path][MAG].shape) == tuple(want.shape) == lora.shapes()[path][MAG]
        torch.testing.assert_close(fresh[path][MAG], want.detach(), **TOL)  # ‖W‖ per output channel


@pytest.mark.parametrize("name", ["linear", "embedding", "conv2d"])
def test_init_lora_weights_false_magnitude_is_the_norm_of_the_updated_weight(name):
    make, kwargs, make_x = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    config = fl.LoraConfig(use_dora=True, init_lora_weights=False, **kwargs)
    lora = fl.LoRA(model, config)
    adapter = lora.init(generator=torch.Generator().manual_seed(0))
    plain = fl.LoRA(model, fl.LoraConfig(init_lora_weights=False, **kwargs))
    factors = {p: {k: v for k, v in leaves.items() if k != MAG} for p, leaves in adapter.items()}
    x = make_x()
    torch.testing.assert_close(lora(adapter, x), plain(factors, x), atol=1e-4, rtol=1e-4)  # = plain LoRA


def test_fresh_adapter_changes_nothing():
    for name in CASES:
        model, kwargs, lora, _, _, x = _setup(name)
        with torch.no_grad():
            torch.testing.assert_close(_logits(lora(lora.init(), x)), _logits(model(x)), **TOL, msg=name)


@pytest.mark.parametrize("name", list(CASES))
def test_trainable_count_equals_peft(name, capsys):
    model, kwargs, lora, adapter, twin, x = _setup(name)
    lora.print_trainable_parameters()
    mine = capsys.readouterr().out
    twin.print_trainable_parameters()
    assert mine == capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        facade = fl.get_peft_model(model, fl.LoraConfig(use_dora=True, **kwargs))
    assert facade.get_nb_trainable_parameters() == twin.get_nb_trainable_parameters()


# --- forward, gradients, merge ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_equal_peft(name):
    model, kwargs, lora, adapter, twin, x = _setup(name)
    with torch.no_grad():
        torch.testing.assert_close(_logits(lora(adapter, x)), _logits(twin(x)), **TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_equal_peft(name):
    model, kwargs, lora, adapter, twin, x = _setup(name)
    leaves = {p: {k: v.clone().requires_grad_() for k, v in d.items()} for p, d in adapter.items()}
    _logits(lora(leaves, x)).square().mean().backward()
    _logits(twin(x)).square().mean().backward()
    params = dict(twin.named_parameters())
    for p, d in leaves.items():
        for k, v in d.items():
            torch.testing.assert_close(v.grad, params[_peft_key(p, k)].grad, atol=1e-5, rtol=1e-4, msg=f"{p}.{k}")


@pytest.mark.parametrize("name", ["linear", "conv2d"])
def test_grad_transform_equals_backward(name):
    model, kwargs, lora, adapter, twin, x = _setup(name)
    leaves = {p: {k: v.clone().requires_grad_() for k, v in d.items()} for p, d in adapter.items()}
    _logits(lora(leaves, x)).square().mean().backward()
    grads = torch.func.grad(lambda a: _logits(lora(a, x)).square().mean())(adapter)
    for p, d in leaves.items():
        for k, v in d.items():
            torch.testing.assert_close(grads[p][k], v.grad, atol=1e-5, rtol=1e-4)


def test_dropout_in_training_equals_peft_with_the_same_seed():
    """PEFT draws one dropout mask per layer on x and recomputes the base on it (DoraLinearLayer.forward,
    base_result=None); the same seed gives the same masks if funclora draws them in the same order."""
    make, kwargs, make_x = CASES["linear"]
    kwargs = dict(kwargs, lora_dropout=0.3)
    torch.manual_seed(0)
    model = make().train()
    lora = fl.LoRA(model, fl.LoraConfig(use_dora=True, **kwargs))
    adapter = _dora_adapter(lora, seed=1)
    twin = _peft_twin(model, kwargs, adapter).train()
    x = make_x()
    torch.manual_seed(123)
    ours = lora(adapter, x)
    torch.manual_seed(123)
    theirs = twin(x)
    torch.testing.assert_close(ours, theirs, **TOL)
    model.eval(), twin.eval()
    assert (lora(adapter, x) - ours).abs().max() > 1e-3  # dropout really acted


@pytest.mark.parametrize("name", [n for n in CASES if n not in GROUPED])
def test_merge_equals_apply_and_peft_merge(name):
    model, kwargs, lora, adapter, twin, x = _setup(name)
    merged = lora.merge(adapter)
    with torch.no_grad():
        torch.testing.assert_close(_logits(torch.func.functional_call(model, merged, (x,))),
                                   _logits(lora(adapter, x)), **TOL)
        # PEFT cannot merge a (1, 1, 1) Conv3d kernel: it takes any kernel whose size()[2:4] is (1, 1)
        # for a 2-D 1x1 conv (peft#3768); our merge is checked against our forward above
        theirs = {} if name == "conv3d" else dict(twin.merge_and_unload().named_parameters())
    for key, value in theirs.items():
        torch.testing.assert_close(merged[key], value, **TOL, msg=key)
    deltas = lora.delta(adapter)
    for key, d in deltas.items():
        torch.testing.assert_close(merged[key], model.get_parameter(key) + d, **TOL)


@pytest.mark.parametrize("name", [n for n in CASES if n not in GROUPED])
def test_unmerge_inverts_merge(name):
    model, kwargs, lora, adapter, twin, x = _setup(name)
    params = lora.unmerge(lora.merge(adapter), adapter)
    for n, p in model.named_parameters():
        torch.testing.assert_close(params[n], p, atol=1e-5, rtol=1e-5, msg=n)


def test_grouped_conv_merge_is_refused_like_peft():
    model, kwargs, lora, adapter, twin, x = _setup("conv2d_grouped")
    with pytest.raises(NotImplementedError, match="groups=4"):
        lora.merge(adapter)
    with pytest.raises(NotImplementedError):
        twin.merge_and_unload()


def test_no_dense_update_is_formed_for_linear_targets():
    model, kwargs, lora, adapter, twin, x = _setup("linear")
    with fl.strict():
        torch.testing.assert_close(lora(adapter, x), twin(x), **TOL)


# --- many adapters -----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching")
@pytest.mark.parametrize("name", ["linear", "gpt2_conv1d", "embedding", "conv2d", "conv2d_grouped"])
def test_vmap_over_stack_equals_loop(name):
    model, kwargs, lora, _, _, x = _setup(name)
    adapters = [_dora_adapter(lora, seed=i) for i in range(3)]
    with torch.no_grad():
        loop = torch.stack([_logits(lora(a, x)) for a in adapters])
        batched = torch.func.vmap(lambda a: _logits(lora(a, x)))(fl.stack(adapters))
    torch.testing.assert_close(batched, loop, **TOL)


@pytest.mark.parametrize("name", ["linear", "gpt2_conv1d", "embedding", "conv2d"])
def test_route_equals_per_example_calls(name):
    """PEFT refuses adapter_names with DoRA ("Cannot pass `adapter_names` when DoRA is enabled."); funclora routes."""
    model, kwargs, lora, _, _, x = _setup(name)
    adapters = [_dora_adapter(lora, seed=i) for i in range(3)]
    index = torch.tensor([2, 0, 1, 2, 0][: x.shape[0]])
    # DoRA layers run once per distinct adapter (route's fallback), which cannot re-assemble a KV cache
    extra = {"use_cache": False} if name == "gpt2_conv1d" else {}
    with torch.no_grad():
        out = _logits(lora.route(fl.stack(adapters), index, x, **extra))
        for i, k in enumerate(index.tolist()):
            torch.testing.assert_close(out[i], _logits(lora(adapters[k], x[i:i + 1]))[0], **TOL)


def test_combine_keeps_a_single_adapter_and_carries_the_magnitude():
    """PEFT's add_weighted_adapter resets the magnitude to ‖W‖ (test_dora_math pins it); funclora keeps
    the law that combining one adapter with weight 1 gives that adapter back."""
    model, kwargs, lora, adapter, twin, x = _setup("linear")
    for method in ("linear", "cat", "svd"):
        mixed, config = lora.combine([adapter], [1.0], method=method)
        assert config.use_dora
        assert all(MAG in leaves for leaves in mixed.values())
        with torch.no_grad():
            torch.testing.assert_close(fl.LoRA(model, config)(mixed, x), lora(adapter, x), atol=1e-4, rtol=1e-4)


# --- files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_funclora_file_loads_in_peft(name, tmp_path):
    model, kwargs, lora, adapter, twin, x = _setup(name)
    fl.save_adapter(tmp_path, adapter, lora=lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's groups > 1 notice
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded(x)), _logits(lora(adapter, x)), **TOL)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    twin.save_pretrained(str(tmp_path / "peft"))
    assert keys == set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)


@pytest.mark.parametrize("name", list(CASES))
def test_peft_file_loads_in_funclora(name, tmp_path):
    model, kwargs, lora, adapter, twin, x = _setup(name)
    twin.save_pretrained(str(tmp_path))
    loaded, config = fl.load_adapter(tmp_path, model=model)
    assert config.use_dora
    for p, leaves in adapter.items():
        for k, v in leaves.items():
            torch.testing.assert_close(loaded[p][k], v, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(_logits(fl.LoRA(model, config)(loaded, x)), _logits(twin(x)), **TOL)


# --- what PEFT refuses ---------------------------------------------------------------------------------
def test_multihead_attention_with_dora_is_refused_like_peft():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(fl.UnsupportedModuleError, match="DoRA"):
        fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2, use_dora=True))


def test_target_parameters_with_dora_is_refused_like_peft():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="DoRA|use_dora"):
        fl.LoRA(model, fl.LoraConfig(target_parameters=["0.weight"], r=2, use_dora=True))


def test_lora_bias_with_dora_is_refused():
    with pytest.raises(ValueError, match="lora_bias"):
        fl.LoraConfig(target_modules=["0"], r=2, use_dora=True, lora_bias=True)


def test_custom_rule_without_dora_support_is_refused_naming_it():
    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return x @ self.w.T

    class AffineRule(fl.Rule):
        def updated_parameters(self, module):
            return ("w",)

        def factors(self, module, r):
            return {"lora_A": fl.Factor((r, 4), "A"), "lora_B": fl.Factor((3, r), "B")}

        def delta(self, module, factors, scaling):
            return {"w": scaling * factors["lora_B"] @ factors["lora_A"]}

    config = fl.LoraConfig(target_modules=["0"], r=2, use_dora=True)
    config.register_custom_module({Affine: AffineRule()})
    with pytest.raises(fl.UnsupportedModuleError, match="DoRA"):
        fl.LoRA(nn.Sequential(Affine()), config)


# --- quantized base -------------------------------------------------------------------------------------
def test_nf4_base_equals_peft():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    for i in (0, 2):
        layer = bnb.nn.Linear4bit(64 if i == 0 else 128, 128 if i == 0 else 64, compute_dtype=torch.float32,
                                  quant_type="nf4")
        layer.load_state_dict(model[i].state_dict())
        model[i] = layer.to("cpu")
    model.train()  # bitsandbytes repacks CPU weights on the first eval call
    kwargs = dict(target_modules=["0", "2"], r=4, lora_alpha=8)
    lora = fl.LoRA(model, fl.LoraConfig(use_dora=True, **kwargs))
    adapter = _dora_adapter(lora, seed=1)
    base = copy.deepcopy(model)
    base.is_loaded_in_4bit = True
    twin = _peft_twin(base, kwargs, adapter).train()
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(lora(adapter, x), twin(x), **TOL)


def test_bf16_base_initial_magnitude_is_peft_s_bf16_rounded_norm():
    torch.manual_seed(0)
    model = _mlp().to(torch.bfloat16)
    kwargs = dict(target_modules=["0", "2"], r=4)
    lora = fl.LoRA(model, fl.LoraConfig(use_dora=True, **kwargs))
    twin = _peft_twin(model, kwargs)
    theirs = dict(twin.named_parameters())
    fresh = lora.init()
    for path in ("0", "2"):
        assert fresh[path][MAG].dtype == torch.float32
        torch.testing.assert_close(fresh[path][MAG], theirs[_peft_key(path, MAG)].detach(), atol=0, rtol=0)
