"""Hypothesis strategies over modules, whole models, configs and adapters, for law tests.

Each strategy needs ``hypothesis`` (a test dependency), imported only when it is called. A
:class:`ModuleCase` carries a seeded module factory, example inputs and a rank that fits, so
``check_rule(case.factory, case.rule, inputs=case.inputs, r=case.r)`` runs the laws on it.

Example:
    >>> from hypothesis import given, settings
    >>> from funclora.testing import check_rule, conv_cases
    >>> @settings(max_examples=3, deadline=None)
    ... @given(case=conv_cases(dims=(1,)))
    ... def test_conv(case):
    ...     check_rule(case.factory, case.rule, inputs=case.inputs, r=case.r)
    >>> test_conv()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.config import LoraConfig
from ..core.rules import ParameterRule, Rule
from ..lora import LoRA
from .inputs import default_inputs, random_adapter

__all__ = ["ModuleCase", "ModelCase", "Experts", "conv_cases", "linear_cases", "embedding_cases", "mha_cases",
           "rnn_cases", "expert_cases", "parameter_cases", "module_cases", "model_cases", "lora_configs",
           "adapters"]


@dataclass(frozen=True)
class ModuleCase:
    """One module to put LoRA on: a seeded ``factory``, example ``inputs``, a rank ``r`` that fits.

    ``rule`` is None for the module type's own rule, or e.g. ``ParameterRule("weight_hh_l0")``.
    ``check_rule(case.factory, case.rule, inputs=case.inputs, r=case.r)`` runs the laws on it.
    """

    label: str
    factory: Callable[[], nn.Module] = field(repr=False)
    inputs: tuple = field(repr=False)
    r: int = 2
    rule: Rule | None = None

    def build(self) -> nn.Module:
        return self.factory()


@dataclass(frozen=True)
class ModelCase:
    """A small whole model with inputs and a LoRA config's targets (for law tests over models)."""

    label: str
    factory: Callable[[], nn.Module] = field(repr=False)
    inputs: tuple = field(repr=False)
    target_modules: list | None = None
    target_parameters: list | None = None
    modules_to_save: list | None = None

    def build(self) -> nn.Module:
        return self.factory()


class _Seeded:
    """``ctor(*args, **kwargs)`` built under ``torch.manual_seed(seed)``: the same module each call."""

    def __init__(self, seed, ctor, *args, **kwargs):
        self.seed, self.ctor, self.args, self.kwargs = seed, ctor, args, kwargs

    def __call__(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.ctor(*self.args, **self.kwargs)


class Experts(nn.Module):
    """A stack of ``E`` expert matrices in one 3-D parameter ``w`` (an MoE layer's layout).

    ``w`` is ``(E, d_out, d_in)``, or ``(E, d_in, d_out)`` with ``is_transposed=True`` (PEFT's
    flag). Forward: ``x (E, n, d_in) → (E, n, d_out)``, expert ``e`` applied to ``x[e]``.
    """

    def __init__(self, experts: int, d_in: int, d_out: int, is_transposed: bool = False):
        super().__init__()
        self.is_transposed = is_transposed
        shape = (experts, d_in, d_out) if is_transposed else (experts, d_out, d_in)
        self.w = nn.Parameter(torch.randn(shape) / math.sqrt(d_in))

    def forward(self, x):
        w = self.w if self.is_transposed else self.w.transpose(-2, -1)
        return x @ w

    def example_inputs(self, generator=None):
        """``(x,)`` with ``x (E, 3, d_in)``."""
        experts, a, b = self.w.shape
        return (torch.randn(experts, 3, a if self.is_transposed else b, generator=generator),)


def _st():
    try:
        from hypothesis import strategies as st
    except ImportError as e:  # pragma: no cover - hypothesis is a test dependency
        raise ImportError("funclora.testing strategies need hypothesis: pip install hypothesis") from e
    return st


def _randn(seed, *shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def conv_cases(dims=(1, 2, 3), *, max_groups: int = 3, dilation: bool = True,
               padding_modes=("zeros", "reflect", "circular", "replicate"), max_rank: int = 3):
    """Conv1d/2d/3d over in/out channels, kernel sizes (incl. ``(1, 1, k)``), strides, paddings,
    dilations, padding modes, groups and ranks (``r`` a multiple of ``groups``).

    ``dilation=False, padding_modes=("zeros",)`` keeps to the convs PEFT computes right.
    """
    st = _st()

    @st.composite
    def case(draw):
        dim = draw(st.sampled_from(dims))
        groups = draw(st.integers(1, max_groups))
        c_in = groups * draw(st.integers(1, 3))
        c_out = groups * draw(st.integers(1, 3))
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
        stride = draw(st.integers(1, 2))
        dil = draw(st.integers(1, 2)) if dilation else 1
        mode = draw(st.sampled_from(padding_modes))
        # "same" needs stride 1; with an odd total padding PyTorch warns it copies the input
        symmetric = all((k - 1) * dil % 2 == 0 for k in kernel)
        padding = draw(st.sampled_from(["same", 0, 1, 2] if stride == 1 and symmetric else [0, 1, 2]))
        r = groups * draw(st.integers(1, max_rank))
        seed = draw(st.integers(0, 2**16))
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        kwargs = dict(stride=stride, padding=padding, dilation=dil, groups=groups, padding_mode=mode)
        factory = _Seeded(seed, conv, c_in, c_out, kernel, **kwargs)
        label = f"{conv.__name__}({c_in}, {c_out}, {kernel}, {kwargs})"
        return ModuleCase(label, factory, default_inputs(factory(), torch.Generator().manual_seed(seed)), r)

    return case()


def linear_cases(max_features: int = 12, max_rank: int = 4):
    """``nn.Linear`` over in/out sizes and ranks (with and without bias)."""
    st = _st()

    @st.composite
    def case(draw):
        i, o = draw(st.integers(1, max_features)), draw(st.integers(1, max_features))
        bias, seed = draw(st.booleans()), draw(st.integers(0, 2**16))
        return ModuleCase(f"Linear({i}, {o}, bias={bias})", _Seeded(seed, nn.Linear, i, o, bias=bias),
                          (_randn(seed, 3, i),), draw(st.integers(1, max_rank)))

    return case()


def embedding_cases(max_rank: int = 4):
    """``nn.Embedding`` over sizes, ``padding_idx`` and ranks."""
    st = _st()

    @st.composite
    def case(draw):
        num, dim = draw(st.integers(2, 20)), draw(st.integers(1, 8))
        padding_idx = draw(st.one_of(st.none(), st.integers(0, num - 1)))
        seed = draw(st.integers(0, 2**16))
        factory = _Seeded(seed, nn.Embedding, num, dim, padding_idx=padding_idx)
        return ModuleCase(f"Embedding({num}, {dim}, padding_idx={padding_idx})", factory,
                          default_inputs(factory(), torch.Generator().manual_seed(seed)),
                          draw(st.integers(1, max_rank)))

    return case()


def mha_cases(max_rank: int = 4):
    """``nn.MultiheadAttention`` (same embed dim for q/k/v) over sizes, heads, bias, batch_first."""
    st = _st()

    @st.composite
    def case(draw):
        heads = draw(st.integers(1, 3))
        embed = heads * draw(st.integers(1, 4))
        bias, batch_first = draw(st.booleans()), draw(st.booleans())
        seed = draw(st.integers(0, 2**16))
        kwargs = dict(bias=bias, batch_first=batch_first)
        module = _Seeded(seed, nn.MultiheadAttention, embed, heads, **kwargs)
        inputs = default_inputs(module(), torch.Generator().manual_seed(seed))
        return ModuleCase(f"MultiheadAttention({embed}, {heads}, {kwargs})", module, inputs,
                          draw(st.integers(1, max_rank)))

    return case()


def rnn_cases(kinds=("LSTM", "GRU", "RNN")):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` over sizes, layers, bidirectional, ``proj_size``, batch_first."""
    st = _st()

    @st.composite
    def case(draw):
        kind = draw(st.sampled_from(kinds))
        hidden = draw(st.integers(2, 6))
        kwargs = dict(num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
                      batch_first=draw(st.booleans()), bias=draw(st.booleans()))
        if kind == "LSTM" and draw(st.booleans()):
            kwargs["proj_size"] = draw(st.integers(1, hidden - 1))
        size = draw(st.integers(1, 5))
        seed = draw(st.integers(0, 2**16))
        ctor = getattr(nn, kind)
        return ModuleCase(f"{kind}({size}, {hidden}, {kwargs})", _Seeded(seed, ctor, size, hidden, **kwargs),
                          (_randn(seed, 3, 4, size),), draw(st.integers(1, 3)))

    return case()


def expert_cases(max_rank: int = 3):
    """:class:`Experts` (a 3-D parameter) over experts, sizes, ``is_transposed`` and ranks."""
    st = _st()

    @st.composite
    def case(draw):
        e, d_in, d_out = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
        transposed, seed = draw(st.booleans()), draw(st.integers(0, 2**16))
        return ModuleCase(f"Experts({e}, {d_in}, {d_out}, is_transposed={transposed})",
                          _Seeded(seed, Experts, e, d_in, d_out, transposed), (_randn(seed, e, 3, d_in),),
                          draw(st.integers(1, max_rank)), ParameterRule("w"))

    return case()


def parameter_cases():
    """A ≥2-D parameter and the generic ``ParameterRule`` for it: any weight of an LSTM / GRU /
    RNN (all layers, ``_reverse``, ``weight_hr`` with ``proj_size``), MultiheadAttention's
    ``in_proj_weight``, or an expert stack."""
    st = _st()

    @st.composite
    def case(draw):
        base = draw(st.one_of(rnn_cases(), mha_cases()))
        names = [n for n, p in base.factory().named_parameters() if p.dim() >= 2 and "." not in n]
        name = draw(st.sampled_from(names))
        return ModuleCase(f"{base.label}.{name}", base.factory, base.inputs, base.r, ParameterRule(name))

    return st.one_of(case(), expert_cases())


def module_cases():
    """Any built-in case: Linear, Conv, Embedding, MultiheadAttention, or a ParameterRule case."""
    st = _st()
    return st.one_of(linear_cases(), conv_cases(), embedding_cases(), mha_cases(), parameter_cases())


class _MLP(nn.Sequential):
    def __init__(self, sizes):
        layers = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        super().__init__(*layers)


class _ConvNet(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1, padding_mode="reflect")
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean((-2, -1)))


class _Tagger(nn.Module):
    def __init__(self, vocab, dim, tags):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, tags)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0])


def model_cases():
    """Small whole models with inputs and targets: an MLP, a conv net, an embedding + LSTM tagger."""
    st = _st()

    @st.composite
    def mlp(draw):
        sizes = draw(st.lists(st.integers(1, 10), min_size=2, max_size=4))
        seed = draw(st.integers(0, 2**16))
        linear = [str(2 * i) for i in range(len(sizes) - 1)]
        targets = draw(st.lists(st.sampled_from(linear), min_size=1, unique=True))
        saved = [linear[-1]] if draw(st.booleans()) and linear[-1] not in targets else None
        return ModelCase(f"MLP{tuple(sizes)}", _Seeded(seed, _MLP, sizes), (_randn(seed, 4, sizes[0]),),
                         targets, None, saved)

    @st.composite
    def convnet(draw):
        channels, seed = draw(st.integers(1, 4)), draw(st.integers(0, 2**16))
        targets = draw(st.lists(st.sampled_from(["conv1", "conv2", "head"]), min_size=1, unique=True))
        return ModelCase(f"ConvNet({channels})", _Seeded(seed, _ConvNet, channels, 3),
                         (_randn(seed, 2, 3, 6, 6),), targets)

    @st.composite
    def tagger(draw):
        dim, seed = draw(st.integers(2, 6)), draw(st.integers(0, 2**16))
        params = draw(st.lists(st.sampled_from(["lstm.weight_ih_l0", "lstm.weight_hh_l0"]), min_size=1, unique=True))
        modules = draw(st.lists(st.sampled_from(["emb", "head"]), unique=True))
        ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(seed))
        return ModelCase(f"Tagger({dim})", _Seeded(seed, _Tagger, 11, dim, 3), (ids,), modules or None, params)

    return st.one_of(mlp(), convnet(), tagger())


def lora_configs(case: ModelCase, *, dropout: bool = False):
    """``LoraConfig`` s for ``case``'s targets over r, lora_alpha, rsLoRA and init."""
    st = _st()

    @st.composite
    def config(draw):
        kwargs = dict(r=draw(st.integers(1, 4)), lora_alpha=draw(st.sampled_from([1, 2, 8, 16])),
                      use_rslora=draw(st.booleans()),
                      init_lora_weights=draw(st.sampled_from([True, "gaussian", False])))
        if dropout and not case.target_parameters:
            kwargs["lora_dropout"] = draw(st.sampled_from([0.0, 0.1]))
        return LoraConfig(target_modules=case.target_modules or ([] if case.target_parameters else None),
                          target_parameters=case.target_parameters, modules_to_save=case.modules_to_save,
                          **kwargs)

    return config()


def adapters(lora: LoRA, *, scale: float = 1.0):
    """Random non-zero adapters for ``lora`` (see :func:`random_adapter`), one per drawn seed."""
    st = _st()
    return st.integers(0, 2**31 - 1).map(lambda seed: random_adapter(lora, seed=seed, scale=scale))
