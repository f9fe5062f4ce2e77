"""funclora.core.dora against PEFT 0.21.2's own DoRA layers, and its laws.

Each case builds a one-module model, wraps it with ``peft.get_peft_model(use_dora=True)``, copies
random non-zero ``A``, ``B`` and magnitude values into PEFT's layer and compares outputs, gradients
(w.r.t. A, B, m), merged weights, norms and the initial magnitude with the pure functions.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from funclora.core import dora, dora_forward

TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-5, rtol=1e-5)


def _conv1d_t(n_in, n_out):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(n_out, n_in)  # Conv1D(nf=out, nx=in): weight (in, out)


# name -> (make module, kind, r, input maker)
CASES = {
    "linear": (lambda: nn.Linear(12, 10), "linear", 4, lambda: torch.randn(5, 12)),
    "linear_nobias_3d": (lambda: nn.Linear(12, 10, bias=False), "linear", 3, lambda: torch.randn(2, 4, 12)),
    "conv1d_t": (lambda: _conv1d_t(12, 10), "conv1d_t", 4, lambda: torch.randn(2, 3, 12)),
    "embedding": (lambda: nn.Embedding(20, 8, padding_idx=0), "embedding", 4,
                  lambda: torch.tensor([[0, 3, 5, 19], [7, 7, 1, 0]])),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3, stride=2, padding=1), "conv", 2, lambda: torch.randn(2, 3, 11)),
    "conv2d": (lambda: nn.Conv2d(3, 8, 3, padding=1), "conv", 4, lambda: torch.randn(2, 3, 6, 6)),
    "conv2d_1x1": (lambda: nn.Conv2d(5, 7, 1), "conv", 3, lambda: torch.randn(2, 5, 4, 4)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (2, 3, 3), padding=(0, 1, 1)), "conv", 2, lambda: torch.randn(2, 2, 3, 5, 5)),
    "conv2d_groups2": (lambda: nn.Conv2d(4, 6, 3, groups=2), "conv", 4, lambda: torch.randn(2, 4, 6, 6)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1), "conv", 4, lambda: torch.randn(2, 4, 5, 5)),
    "conv1d_groups3": (lambda: nn.Conv1d(6, 9, 3, groups=3), "conv", 6, lambda: torch.randn(2, 6, 8)),
}


class MaskDropout(nn.Module):
    """A deterministic stand-in for PEFT's nn.Dropout (not an nn.Identity, so PEFT takes its dropout path)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def _peft_layer(name, *, dropout=0.0, init=True, dtype=torch.float32, seed=0):
    """``(module, lora_layer, leaves, x, kind, s)``: PEFT's DoRA layer with random A, B, m copied in."""
    import peft

    make, kind, r, make_x = CASES[name]
    torch.manual_seed(seed)
    module = make().to(dtype)
    x = make_x()
    if x.is_floating_point():
        x = x.to(dtype)
    kwargs = dict(r=r, lora_alpha=2 * r + 1, target_modules=["0"], use_dora=True, lora_dropout=dropout,
                  init_lora_weights=init, fan_in_fan_out=kind == "conv1d_t")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's groups > 1 / fan_in_fan_out notices
        model = peft.get_peft_model(nn.Sequential(copy.deepcopy(module)), peft.LoraConfig(**kwargs))
    layer = model.base_model.model[0]
    return module, layer, x, kind, layer.scaling["default"]


def _peft_params(layer, kind):
    if kind == "embedding":
        A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return A, B, layer.lora_magnitude_vector["default"].weight


def _randomize(layer, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    A, B, m = _peft_params(layer, kind)
    with torch.no_grad():
        A.copy_(0.3 * torch.randn(A.shape, generator=g))
        B.copy_(0.3 * torch.randn(B.shape, generator=g))
        m.copy_(m * (1 + 0.2 * torch.randn(m.shape, generator=g)))
    return {"A": A.detach().clone(), "B": B.detach().clone(), "m": m.detach().clone()}


def _ours(module, kind, leaves, s, x, *, x_dropped=None):
    A, B, m = leaves["A"], leaves["B"], leaves["m"]
    if kind == "linear":
        return dora_forward.linear_forward(x, module.weight, module.bias, A, B, m, s, x_dropped=x_dropped)
    if kind == "conv1d_t":
        return dora_forward.conv1d_t_forward(x, module.weight, module.bias, A, B, m, s, x_dropped=x_dropped)
    if kind == "embedding":
        return dora_forward.embedding_forward(x, module.weight, A, B, m, s, padding_idx=module.padding_idx)
    return dora_forward.conv_forward(x, module.weight, module.bias, A, B, m, s, stride=module.stride,
                             padding=module.padding, dilation=module.dilation, groups=module.groups,
                             x_dropped=x_dropped)


def _groups(module):
    return getattr(module, "groups", 1)


# --- outputs, gradients, merge ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_equal_peft(name):
    module, layer, x, kind, s = _peft_layer(name)
    leaves = _randomize(layer, kind)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(_ours(module, kind, leaves, s, x), layer(x), **TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_wrt_a_b_m_equal_peft(name):
    module, layer, x, kind, s = _peft_layer(name)
    leaves = {k: v.requires_grad_() for k, v in _randomize(layer, kind).items()}
    layer.eval()
    target = torch.randn(_ours(module, kind, leaves, s, x).shape, generator=torch.Generator().manual_seed(5))
    (_ours(module, kind, leaves, s, x) * target).sum().backward()
    (layer(x) * target).sum().backward()
    for ours, theirs in zip(leaves.values(), _peft_params(layer, kind)):
        torch.testing.assert_close(ours.grad, theirs.grad, **GRAD_TOL)


@pytest.mark.parametrize("name", [n for n in CASES if n != "embedding"])
def test_dropout_path_equals_peft_with_the_same_mask(name):
    """Training with dropout: PEFT recomputes the base on dropout(x) (DoraLinearLayer.forward, base_result=None)."""
    module, layer, x, kind, s = _peft_layer(name, dropout=0.3)
    leaves = {k: v.requires_grad_() for k, v in _randomize(layer, kind).items()}
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.3).float() / 0.7
    layer.lora_dropout["default"] = MaskDropout(mask)
    layer.train()
    ours = _ours(module, kind, leaves, s, x, x_dropped=x * mask)
    theirs = layer(x)
    torch.testing.assert_close(ours, theirs, **TOL)
    # and it is not the no-dropout output (the recomputed base really enters)
    assert (ours - _ours(module, kind, leaves, s, x)).abs().max() > 1e-3
    ours.square().sum().backward()
    theirs.square().sum().backward()
    for mine, peft_param in zip(leaves.values(), _peft_params(layer, kind)):
        torch.testing.assert_close(mine.grad, peft_param.grad, **GRAD_TOL)


def test_embedding_has_no_dropout_in_peft():
    module, layer, x, kind, s = _peft_layer("embedding", dropout=0.5)
    leaves = _randomize(layer, kind)
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(_ours(module, kind, leaves, s, x), layer(x), **TOL)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if "groups" not in n and "depthwise" not in n])
def test_merged_weight_equals_peft_and_unmerges(name):
    module, layer, x, kind, s = _peft_layer(name)
    leaves = _randomize(layer, kind)
    W = module.weight.detach()
    merged, norm = dora.merged_weight(W, leaves["A"], leaves["B"], leaves["m"], s, kind, return_norm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
        peft_merged = layer.get_base_layer().weight.detach().clone()
        layer.unmerge()
    torch.testing.assert_close(merged, peft_merged, **TOL)
    torch.testing.assert_close(dora.unmerged_weight(merged, leaves["A"], leaves["B"], leaves["m"], s, kind, norm),
                               W, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dora.dora_delta(W, leaves["A"], leaves["B"], leaves["m"], s, kind), merged - W)
    # the merged layer computes the DoRA output
    layer.eval()
    with torch.no_grad():
        merged_module = copy.deepcopy(module)
        merged_module.weight.copy_(merged)
        torch.testing.assert_close(merged_module(x), _ours(module, kind, leaves, s, x), **TOL)


@pytest.mark.parametrize("name", ["conv2d_groups2", "conv2d_depthwise"])
def test_grouped_conv_merge_refused_like_peft(name):
    module, layer, x, kind, s = _peft_layer(name)
    leaves = _randomize(layer, kind)
    with pytest.raises(NotImplementedError, match="groups"):
        layer.merge()
    with pytest.raises(NotImplementedError, match=f"groups={module.groups}"):
        dora.merged_weight(module.weight, leaves["A"], leaves["B"], leaves["m"], s, kind, groups=module.groups)


# --- norms and init -----------------------------------------------------------------------------------
def _peft_norm(layer, kind, W, A, B, s):
    """PEFT's own get_weight_norm with its own lora_weight (the forward's computation), flattened."""
    dl = layer.lora_magnitude_vector["default"]
    if kind == "embedding":
        lw = dl.get_lora_weight(A.T, B.T)
    elif kind == "conv":
        lw = dl.get_lora_weight(layer.lora_A["default"], layer.lora_B["default"]).reshape(W.shape)
    else:
        lw = dl.get_lora_weight(layer.lora_A["default"], layer.lora_B["default"])
    return dl.get_weight_norm(W, lw.detach(), s).reshape(-1)


@pytest.mark.parametrize("name", list(CASES))
def test_factored_norm_equals_peft_norm(name):
    module, layer, x, kind, s = _peft_layer(name)
    leaves = _randomize(layer, kind)
    with torch.no_grad():
        theirs = _peft_norm(layer, kind, module.weight, leaves["A"], leaves["B"], s)
    ours = dora.weight_norm(module.weight, leaves["A"], leaves["B"], s, kind, groups=_groups(module), dense_max=0)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-5)   # the factored form
    base_sq = dora.base_sq_norm(module.weight, kind)
    torch.testing.assert_close(dora.weight_norm(module.weight, leaves["A"], leaves["B"], s, kind,
                                                groups=_groups(module), base_sq=base_sq, dense_max=0), ours)
    small = dora.weight_norm(module.weight, leaves["A"], leaves["B"], s, kind, groups=_groups(module))
    torch.testing.assert_close(small, theirs, atol=0, rtol=1e-6)   # a small weight's dense form
    torch.testing.assert_close(dora.dense_weight_norm(module.weight, leaves["A"], leaves["B"], s, kind,
                                                      groups=_groups(module)), theirs, atol=0, rtol=1e-6)


def _ill_conditioned(out, inn, r, t, bad_rows, seed=0):
    """``W`` whose first ``bad_rows`` rows nearly cancel ``s·B@A`` (``‖W_i + s·(BA)_i‖ ≈ (1-t)``·…)."""
    g = torch.Generator().manual_seed(seed)
    A, B, s = torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g), 0.5
    W = torch.randn(out, inn, generator=g)
    W[:bad_rows] = -t * s * (B[:bad_rows] @ A) + (1 - t) * torch.randn(bad_rows, inn, generator=g)
    return W, A, B, s


@pytest.mark.parametrize("t", [0.9, 0.99, 0.999])
def test_ill_conditioned_rows_are_repaired(t):
    """Where the update nearly cancels a row, the factored formula loses ~1e-7/ratio; those rows are redone densely."""
    W, A, B, s = _ill_conditioned(40, 64, 6, t, bad_rows=dora.REPAIR_ROWS)
    truth = (W.double() + s * B.double() @ A.double()).norm(dim=1)
    peft_like = (W + s * (B @ A)).norm(dim=1)
    ours = dora.weight_norm(W, A, B, s, "linear", dense_max=0)   # the factored path (small weights go dense)
    unrepaired = dora.weight_norm(W, A, B, s, "linear", repair_rows=0, dense_max=0)
    peft_error = ((peft_like.double() - truth) / truth).abs().max()
    assert ((ours.double() - truth) / truth).abs().max() <= max(1e-6, 3 * peft_error)
    # vs PEFT's fp32 dense norm: ≤ 1e-5 where PEFT's own error allows it (at t = 0.999 two dense
    # fp32 computations already differ by ~1e-5: the row is ~1e-3 of its parts)
    torch.testing.assert_close(ours, peft_like, atol=0, rtol=max(1e-5, 4 * peft_error.item()))
    if t >= 0.99:
        assert ((unrepaired.double() - truth) / truth).abs().max() > 1e-4  # what the repair is for


def test_more_bad_rows_than_repair_rows_need_a_larger_budget():
    W, A, B, s = _ill_conditioned(40, 64, 6, 0.99, bad_rows=30)
    truth = (W.double() + s * B.double() @ A.double()).norm(dim=1)
    peft_error = (((W + s * (B @ A)).norm(dim=1).double() - truth) / truth).abs().max()
    ours = dora.weight_norm(W, A, B, s, "linear", repair_rows=40, dense_max=0)
    assert ((ours.double() - truth) / truth).abs().max() <= max(1e-6, 3 * peft_error)
    default = dora.weight_norm(W, A, B, s, "linear", dense_max=0)
    assert ((default.double() - truth) / truth).abs().max() > 1e-5  # the documented limit


def test_exact_cancellation_clamps_to_zero_not_nan():
    A, B = torch.randn(2, 3), torch.randn(4, 2)
    W = -(B @ A)
    norm = dora.weight_norm(W, A, B, 1.0, "linear", repair_rows=0)
    assert torch.isfinite(norm).all() and (norm >= 0).all() and norm.max() < 1e-2


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("init", [True, False])
def test_magnitude_init_equals_peft(name, init):
    module, layer, x, kind, s = _peft_layer(name, init=init)
    A, B, m = _peft_params(layer, kind)
    assert tuple(m.shape) == dora.magnitude_shape(module.weight.shape, kind)
    ours = dora.magnitude_init(module.weight, kind, A, B, s, groups=_groups(module))
    torch.testing.assert_close(ours, m.detach(), **TOL)
    if init:
        torch.testing.assert_close(dora.magnitude_init(module.weight, kind), m.detach(), **TOL)


def test_magnitude_init_bf16_base_is_computed_in_bf16_like_peft():
    """PEFT computes the initial norm before upcasting its factors: a bf16 base gives a bf16-rounded m."""
    module, layer, x, kind, s = _peft_layer("linear", init=False, dtype=torch.bfloat16)
    A, B, m = _peft_params(layer, kind)
    assert m.dtype == torch.float32
    ours = dora.magnitude_init(module.weight, kind, A, B, s)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), m.detach(), atol=0, rtol=0)


def test_fresh_peft_dora_on_bf16_base_is_not_exactly_identity():
    """Consequence of the bf16-rounded magnitude: scale = m_bf16 / ‖W‖_fp32 ≠ 1 (up to 2⁻⁹)."""
    module, layer, x, kind, s = _peft_layer("linear", dtype=torch.bfloat16)
    A, B, m = _peft_params(layer, kind)
    norm = dora.weight_norm(module.weight, A, B, s, kind)
    scale = dora.dora_scale(m, norm)
    assert (scale - 1).abs().max() > 0
    assert (scale - 1).abs().max() <= 2 ** -8


# --- torch.func ----------------------------------------------------------------------------------
def _stack(leaves_list):
    return {k: torch.stack([leaves[k] for leaves in leaves_list]) for k in leaves_list[0]}


@pytest.mark.parametrize("name", ["linear", "conv1d_t", "embedding", "conv2d", "conv2d_groups2"])
def test_vmap_over_stacked_adapters_equals_loop(name):
    module, layer, x, kind, s = _peft_layer(name)
    adapters = [_randomize(layer, kind, seed=i) for i in range(3)]
    loop = torch.stack([_ours(module, kind, a, s, x) for a in adapters])
    batched = torch.func.vmap(lambda a: _ours(module, kind, a, s, x))(_stack(adapters))
    torch.testing.assert_close(batched, loop, **TOL)


@pytest.mark.parametrize("name", ["linear", "embedding", "conv2d_groups2"])
def test_grad_and_vmap_grad_equal_backward(name):
    module, layer, x, kind, s = _peft_layer(name)
    adapters = [_randomize(layer, kind, seed=i) for i in range(2)]

    def loss(a):
        return _ours(module, kind, a, s, x).square().mean()

    expected = []
    for a in adapters:
        leaves = {k: v.clone().requires_grad_() for k, v in a.items()}
        loss(leaves).backward()
        expected.append({k: v.grad for k, v in leaves.items()})
    for got, want in zip([torch.func.grad(loss)(a) for a in adapters], expected):
        for k in want:
            torch.testing.assert_close(got[k], want[k], **GRAD_TOL)
    batched = torch.func.vmap(torch.func.grad(loss))(_stack(adapters))
    for k in expected[0]:
        torch.testing.assert_close(batched[k], torch.stack([e[k] for e in expected]), **GRAD_TOL)


def test_norm_is_detached_no_gradient_through_it():
    W, A, B = torch.randn(5, 6), torch.randn(2, 6, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    norm = dora.weight_norm(W, A, B, 1.0, "linear")
    assert not norm.requires_grad


def test_compiles_fullgraph():
    module = nn.Linear(8, 6)
    A, B, m = torch.randn(2, 8), torch.randn(6, 2), torch.rand(6) + 0.5
    x = torch.randn(3, 8)
    fn = torch.compile(lambda x, A, B, m: dora_forward.linear_forward(x, module.weight, module.bias, A, B, m, 0.5),
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, A, B, m), dora_forward.linear_forward(x, module.weight, module.bias, A, B, m, 0.5))


# --- laws (hypothesis) --------------------------------------------------------------------------------
@st.composite
def linear_problems(draw):
    out, inn, r = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["linear", "conv1d_t", "embedding"]))
    seed = draw(st.integers(0, 2 ** 16))
    s = draw(st.sampled_from([0.25, 1.0, 2.0, 16.0]))
    g = torch.Generator().manual_seed(seed)
    W = torch.randn((out, inn) if kind == "linear" else (inn, out), generator=g)
    return kind, W, torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g), s, g


def _linear_like(kind, x, W, A, B, m, s):
    if kind == "embedding":
        return dora_forward.embedding_forward(x, W, A, B, m, s)
    fn = dora_forward.linear_forward if kind == "linear" else dora_forward.conv1d_t_forward
    return fn(x, W, None, A, B, m, s)


def _input(kind, W, g):
    if kind == "embedding":
        return torch.randint(0, W.shape[0], (3,), generator=g)
    return torch.randn(3, W.shape[1] if kind == "linear" else W.shape[0], generator=g)


def _plain(kind, x, W):
    if kind == "embedding":
        return torch.nn.functional.embedding(x, W)
    return torch.nn.functional.linear(x, W if kind == "linear" else W.T)


LAW_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@LAW_SETTINGS
@given(problem=linear_problems())
def test_law_fresh_adapter_is_identity(problem):
    kind, W, A, B, s, g = problem
    x = _input(kind, W, g)
    zero_B = torch.zeros_like(B)
    m = dora.magnitude_init(W, kind)
    torch.testing.assert_close(_linear_like(kind, x, W, A, zero_B, m, s), _plain(kind, x, W), atol=1e-5, rtol=1e-5)


@LAW_SETTINGS
@given(problem=linear_problems())
def test_law_init_norm_of_updated_weight_gives_plain_lora(problem):
    """PEFT's init with init_lora_weights=False (m = ‖W + sBA‖): DoRA output = plain LoRA output."""
    kind, W, A, B, s, g = problem
    x = _input(kind, W, g)
    m = dora.magnitude_init(W, kind, A, B, s)
    lora = s * (B @ A)
    plain = _plain(kind, x, W + (lora if kind == "linear" else lora.T))
    torch.testing.assert_close(_linear_like(kind, x, W, A, B, m, s), plain, atol=1e-4, rtol=1e-4)


@LAW_SETTINGS
@given(problem=linear_problems())
def test_law_merge_equals_apply_and_unmerge_inverts(problem):
    kind, W, A, B, s, g = problem
    x = _input(kind, W, g)
    m = torch.rand(B.shape[0], generator=g) + 0.5
    merged, norm = dora.merged_weight(W, A, B, m, s, kind, return_norm=True)
    torch.testing.assert_close(_plain(kind, x, merged), _linear_like(kind, x, W, A, B, m, s), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dora.unmerged_weight(merged, A, B, m, s, kind, norm), W, atol=1e-4, rtol=1e-4)
    rows = merged if kind == "linear" else merged.T
    torch.testing.assert_close(rows.norm(dim=1), m, atol=1e-5, rtol=1e-5)  # the merged rows have norm m


@LAW_SETTINGS
@given(problem=linear_problems(), c=st.floats(0.1, 10))
def test_law_output_is_linear_in_the_magnitude(problem, c):
    kind, W, A, B, s, g = problem
    x = _input(kind, W, g)
    m = torch.rand(B.shape[0], generator=g) + 0.5
    torch.testing.assert_close(_linear_like(kind, x, W, A, B, c * m, s), c * _linear_like(kind, x, W, A, B, m, s),
                               atol=1e-4, rtol=1e-4)


@LAW_SETTINGS
@given(problem=linear_problems())
def test_law_factored_norm_equals_dense(problem):
    kind, W, A, B, s, g = problem
    torch.testing.assert_close(dora.weight_norm(W, A, B, s, kind, dense_max=0),
                               dora.dense_weight_norm(W, A, B, s, kind), atol=1e-6, rtol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=st.sampled_from([1, 2, 3]), per_group_in=st.integers(1, 3), per_group_out=st.integers(1, 3),
       rank_mult=st.integers(1, 2), k=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_law_grouped_conv_factored_norm_equals_peft_layout(groups, per_group_in, per_group_out, rank_mult, k, seed):
    g = torch.Generator().manual_seed(seed)
    cin, cout, r = groups * per_group_in, groups * per_group_out, groups * rank_mult
    W = torch.randn(cout, per_group_in, k, k, generator=g)
    A, B = torch.randn(r, cin, k, k, generator=g), torch.randn(cout, r // groups, 1, 1, generator=g)
    # PEFT's _DoraConvNdLayer.get_lora_weight, written out
    lw = torch.mm(B.view(-1, r), A.view(r, -1)).reshape(W.shape)
    peft = (W + 0.5 * lw).flatten(1).norm(dim=1)
    for dense_max in (0, dora.DENSE_MAX):
        torch.testing.assert_close(dora.weight_norm(W, A, B, 0.5, "conv", groups=groups, dense_max=dense_max), peft,
                                   atol=1e-6, rtol=1e-5)


# --- quantized base (bitsandbytes, CPU) ------------------------------------------------------------
def test_nf4_base_equals_peft_with_the_layer_output_as_base():
    """PEFT's DoRA on a Linear4bit: base = the quantized layer's output, norm from the dequantized W."""
    bnb = pytest.importorskip("bitsandbytes")
    import peft
    from peft.utils.integrations import dequantize_module_weight

    torch.manual_seed(0)
    dense = nn.Linear(64, 128)
    layer = bnb.nn.Linear4bit(64, 128, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    model = nn.Sequential(layer.to("cpu"))
    model.is_loaded_in_4bit = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True))
    lora_layer = peft_model.base_model.model[0]
    assert type(lora_layer).__module__ == "peft.tuners.lora.bnb"
    leaves = _randomize(lora_layer, "linear")
    peft_model.train()  # in eval mode bitsandbytes repacks the CPU weight on the first call
    x = torch.randn(5, 64)
    quantized = lora_layer.get_base_layer()
    W = dequantize_module_weight(quantized).float()
    torch.testing.assert_close(dora.magnitude_init(W, "linear"), W.norm(dim=1))
    with torch.no_grad():
        theirs = peft_model(x)
        s = lora_layer.scaling["default"]
        scale = dora.dora_scale(leaves["m"], dora.weight_norm(W, leaves["A"], leaves["B"], s, "linear"))
        lora = torch.nn.functional.linear(torch.nn.functional.linear(x, leaves["A"]) * s, leaves["B"])
        ours = dora_forward.combine(quantized(x), lora * scale, scale, quantized.bias)
    torch.testing.assert_close(ours, theirs, **TOL)


# --- PEFT 0.21.2 facts the design relies on (pinned so docs/dora.md stays true) -----------------
def _peft_refusal(model, **config):
    import peft

    with pytest.raises(ValueError) as info:
        peft.get_peft_model(model, peft.LoraConfig(r=2, use_dora=True, **config))
    return str(info.value)


def test_peft_refuses_dora_on_mha_target_parameters_and_lora_bias():
    assert "MultiheadAttention does not support DoRA" in _peft_refusal(
        nn.Sequential(nn.MultiheadAttention(8, 2)), target_modules=["0"])
    assert "ParamWrapper does not work with use_dora=True" in _peft_refusal(
        nn.Sequential(nn.Linear(3, 3)), target_modules=[], target_parameters=["0.weight"])
    import peft

    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        peft.LoraConfig(r=2, use_dora=True, lora_bias=True, target_modules=["0"])


def _two_dora_adapters():
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    config = peft.LoraConfig(r=2, target_modules=["0", "2"], use_dora=True)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.add_adapter("other", config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        for i, name in enumerate(("default", "other")):
            layer.lora_B[name].weight.normal_()
            layer.lora_magnitude_vector[name].weight.mul_(3 + i)
    return base, model, layer


def test_peft_refuses_mixed_batch_with_dora():
    base, model, layer = _two_dora_adapters()
    model.eval()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        model(torch.randn(2, 6), adapter_names=["default", "other"])


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_peft_add_weighted_adapter_resets_the_dora_magnitude(method):
    """PEFT accepts every combination type with DoRA, but the new adapter's magnitude is ‖W‖ (its
    init with B = 0), whatever the sources' magnitudes were (peft#3761 lists DoRA as combined wrongly)."""
    base, model, layer = _two_dora_adapters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type=method)
    assert model.peft_config["mix"].use_dora
    torch.testing.assert_close(layer.lora_magnitude_vector["mix"].weight, base[0].weight.norm(dim=1))


def test_peft_file_keys_and_trainable_count_include_the_magnitude(tmp_path):
    import peft
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(3, 4, 3), nn.Embedding(9, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "1", "2"], use_dora=True))
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    magnitudes = {k: tuple(v.shape) for k, v in saved.items() if "magnitude" in k}
    assert magnitudes == {"base_model.model.0.lora_magnitude_vector": (5,),            # no ".weight" suffix
                          "base_model.model.1.lora_magnitude_vector": (1, 4, 1, 1),
                          "base_model.model.2.lora_magnitude_vector": (7,)}
    in_memory = [n for n, _ in peft_model.named_parameters() if "magnitude" in n]
    assert in_memory == [f"base_model.model.{i}.lora_magnitude_vector.default.weight" for i in range(3)]
    trainable, total = peft_model.get_nb_trainable_parameters()
    lora_only = (2 * 6 + 5 * 2) + (2 * 3 * 9 + 4 * 2) + (2 * 9 + 7 * 2)
    assert trainable == lora_only + 5 + 4 + 7


def test_peft_dora_conv_with_dilation_crashes_like_its_lora():
    import peft

    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(RuntimeError, match="must match"):
        peft_model(torch.randn(1, 3, 9, 9))


def test_unbatched_conv_keeps_its_shape_where_peft_breaks():
    """PEFT's conv DoRA assumes a batch dim: the bias is reshaped to (1, out, 1…) with one 1 too few for an
    unbatched (C, H, W) output (a crash, or the bias taken off the wrong axis when sizes coincide), and the
    (1, out, 1, 1) scale adds a batch dim. funclora's conv_forward keeps (out, H, W)."""
    module, layer, x, kind, s = _peft_layer("conv2d")
    leaves = _randomize(layer, kind)
    layer.eval()
    ours = _ours(module, kind, leaves, s, x[0])
    torch.testing.assert_close(ours, _ours(module, kind, leaves, s, x)[0], **TOL)
    with torch.no_grad(), pytest.raises(RuntimeError, match="must match"):
        layer(x[0])  # Conv2d(3, 8, 3, padding=1) on (3, 6, 6): bias (1, 8, 1) against (8, 6, 6)
    layer.get_base_layer().bias = None
    with torch.no_grad():
        theirs = layer(x[0])
    assert theirs.shape == (1, *ours.shape)
    nobias = _ours(module, kind, leaves, s, x[0]) - module.bias.reshape(-1, 1, 1)
    torch.testing.assert_close(nobias, theirs[0], **TOL)
