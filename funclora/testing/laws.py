"""The laws every LoRA rule must keep, and how each is checked on one module.

:func:`~funclora.testing.check_rule` runs them on a rule applied to one module and raises
:class:`~funclora.RuleCheckError` naming the first broken law, in words:

=====================================  ======================================================
law                                    what it means
=====================================  ======================================================
``well-formed``                        ``factors``, ``updated_parameters`` and ``delta`` agree on
                                       names and shapes; ``delta`` is linear in ``scaling``;
                                       each leaf has its own file key
``module unchanged``                   init, forward, merge and backward leave the module as it
                                       was (values, ``requires_grad``, buffers, modes, hooks)
``fresh adapter is a no-op``           ``lora(lora.init(), x) == module(x)``
``adapter changes the output``         a random adapter does change the output (the forward sees
                                       the update)
``merge equals apply``                 ``lora(a, x) == module run with merge(a)``, and
                                       ``unmerge(merge(a), a) == params``
``gradients reach only the adapter``   with the base frozen, every adapter leaf gets a finite,
                                       non-zero gradient, no base parameter gets one, and it
                                       equals the gradient through ``merge``
``vmap over a stack equals the loop``  ``vmap(lora)(stack(adapters), x)`` equals the loop (skipped
                                       when the module itself cannot be vmapped, e.g. nn.LSTM)
``save/load round-trips``              :mod:`funclora.io` writes PEFT's files and reads back the
                                       same tensors (skipped if ``funclora.io`` is not available)
=====================================  ======================================================
"""

from __future__ import annotations

import copy
import importlib
import math
import tempfile

import optree
import torch

from ..core.pytree import stack
from ..core.rules import Factor
from ..errors import RuleCheckError
from ..lora import LoRA
from .inputs import random_adapter

__all__ = ["LAWS", "LawRun", "snapshot"]

LAWS = (
    "well-formed",
    "module unchanged",
    "fresh adapter is a no-op",
    "adapter changes the output",
    "merge equals apply",
    "gradients reach only the adapter",
    "vmap over a stack equals the loop",
    "save/load round-trips",
)

_ROLES = ("A", "B", "embedding_A", "embedding_B")


class LawRun:
    """The state shared by the laws of one :func:`check_rule` call."""

    def __init__(self, host, lora, target, args, subject, seed, atol, rtol):
        self.host, self.lora, self.target, self.args = host, lora, target, args
        self.subject, self.seed, self.atol, self.rtol = subject, seed, atol, rtol
        self.key = target.path
        with torch.no_grad():
            self.base_out = host(*args)
        self.adapter: dict = {}
        self._params: dict = {}
        self._merge_skip: str | None = None

    def fail(self, law, message):
        raise RuleCheckError(law, self.subject, message)

    def close(self, got, want, *, grad=False):
        """``(ok, error, tolerance)`` comparing two pytrees of tensors."""
        got_l = [t.detach() for t in _tensors(got)]
        want_l = [t.detach() for t in _tensors(want)]
        if len(got_l) != len(want_l):
            return False, math.inf, 0.0
        err = max((float((g.double() - w.double()).abs().max()) for g, w in zip(got_l, want_l) if g.numel()),
                  default=0.0)
        scale = max((float(w.double().abs().max()) for w in want_l if w.numel()), default=0.0)
        tol = self.atol + (10 * self.rtol if grad else self.rtol) * scale
        return err <= tol, err, tol

    # --- laws ---------------------------------------------------------------------------------
    def static(self):
        """The part of 'well-formed' that needs no adapter: factors, roles, file keys, names."""
        t, law = self.target, "well-formed"
        rule, module = t.rule, t.module
        specs = rule.factors(module, t.r)
        if not isinstance(specs, dict) or not specs:
            self.fail(law, f"factors(module, r={t.r}) must return a non-empty dict {{leaf name: Factor}}, "
                           f"got {specs!r}.")
        for leaf, spec in specs.items():
            if not isinstance(leaf, str) or not isinstance(spec, Factor):
                self.fail(law, f"factors() must map leaf names (str) to funclora.Factor, found {leaf!r}: {spec!r}.")
            if not all(isinstance(n, int) and n > 0 for n in spec.shape):
                self.fail(law, f"factors()[{leaf!r}] has shape {spec.shape}; sizes must be positive ints.")
            if spec.role not in _ROLES:
                self.fail(law, f"factors()[{leaf!r}] has role {spec.role!r}; use one of {list(_ROLES)}.")
        file_keys = [rule.file_key(leaf) for leaf in specs]
        if len(set(file_keys)) != len(file_keys):
            self.fail(law, f"file_key() maps two leaves to one file key: {dict(zip(specs, file_keys))}; "
                           "each leaf needs its own key to be saved.")
        names = rule.updated_parameters(module)
        if isinstance(names, str) or not names or len(set(names)) != len(names):
            self.fail(law, f"updated_parameters(module) must return distinct parameter names, got {names!r}.")
        for name in names:
            try:
                self._params[name] = module.get_parameter(name)
            except AttributeError:
                own = [n for n, _ in module.named_parameters()]
                self.fail(law, f"updated_parameters() names {name!r}, which is not a parameter of the "
                               f"{type(module).__name__}; its parameters are {own}.")

    def well_formed(self):
        t, law = self.target, "well-formed"
        rule, module, params = t.rule, t.module, self._params
        names = tuple(params)
        factors = self.adapter[self.key]
        try:
            delta = rule.delta(module, factors, t.scaling)
        except NotImplementedError as e:
            self._merge_skip = f"delta() raises NotImplementedError ({e})"
            return None
        if not isinstance(delta, dict) or set(delta) != set(names):
            found = sorted(delta) if isinstance(delta, dict) else type(delta).__name__
            self.fail(law, f"delta() returned {found}, but updated_parameters() says {list(names)}; "
                           "return one update per updated parameter.")
        for name, d in delta.items():
            if tuple(d.shape) != tuple(params[name].shape):
                self.fail(law, f"delta()[{name!r}] has shape {tuple(d.shape)}, but the parameter is "
                               f"{tuple(params[name].shape)}; the update must have the weight's shape.")
        twice = rule.delta(module, factors, 2 * t.scaling)
        ok, err, tol = self.close(twice, {n: 2 * d for n, d in delta.items()})
        if not ok:
            self.fail(law, f"delta(module, factors, 2·s) is not 2·delta(module, factors, s) (off by {err:.3g}); "
                           "multiply the update by `scaling`.")
        return None

    def exercise(self):
        """Run what the other laws run (so 'module unchanged' can be checked early)."""
        self.lora(self.lora.init(generator=torch.Generator().manual_seed(self.seed)), *self.args)
        self.lora(self.adapter, *self.args)
        if self._merge_skip is None:
            try:
                self.lora.merge(self.adapter)
            except NotImplementedError:
                pass

    def unchanged(self, before):
        after = snapshot(self.host)
        for what in ("tree", "modes", "hooks", "ids", "requires_grad"):
            if before[what] != after[what]:
                self.fail("module unchanged", f"the module's {what} changed while running LoRA: "
                                              f"{before[what]} became {after[what]}. A rule must not change the module.")
        for what in ("params", "buffers"):
            for name, value in before[what].items():
                if not torch.equal(value, after[what][name]):
                    self.fail("module unchanged", f"the module's {what[:-1]} {name!r} changed while running "
                                                  "LoRA; a rule must read the module, never write it (return new "
                                                  "tensors from delta()/overlay()).")

    def fresh_is_noop(self):
        fresh = self.lora.init(generator=torch.Generator().manual_seed(self.seed))
        ok, err, tol = self.close(self.lora(fresh, *self.args), self.base_out)
        if not ok:
            roles = {leaf: spec.role for leaf, spec in self.target.rule.factors(self.target.module, self.target.r).items()}
            self.fail("fresh adapter is a no-op",
                      f"a fresh adapter (init_lora_weights=True) changes the output by {err:.3g} (tolerance "
                      f"{tol:.3g}); the roles are {roles}: give one factor of each pair the role 'B' "
                      "(zeros) so that ΔW = 0 at init.")
        return None

    def changes_output(self):
        out = self.lora(self.adapter, *self.args)
        ok, err, tol = self.close(out, self.base_out)
        if ok:
            names = list(self.target.rule.updated_parameters(self.target.module))
            self.fail("adapter changes the output",
                      f"a random adapter leaves the output unchanged (difference {err:.3g}); the forward does "
                      f"not see the update of {names}. Does the module's forward read these parameters (and "
                      "not a copy cached in __init__)? Does overlay() return the updated tensors?")
        return None

    def merge_equals_apply(self):
        if self._merge_skip:
            return f"merge is impossible for this module: {self._merge_skip}"
        law = "merge equals apply"
        try:
            merged = self.lora.merge(self.adapter)
        except NotImplementedError as e:
            self._merge_skip = str(e)
            return f"merge is impossible for this module: {e}"
        out = self.lora(self.adapter, *self.args)
        want = torch.func.functional_call(self.host, merged, self.args)
        ok, err, tol = self.close(out, want)
        if not ok:
            self.fail(law, f"lora(adapter, x) and the module run with merge(adapter) differ by {err:.3g} "
                           f"(tolerance {tol:.3g}): overlay() and delta() disagree. The forward must see "
                           "exactly W + delta(); check the layout (transposes, reshapes) in both.")
        params = dict(self.host.named_parameters())
        restored = self.lora.unmerge(merged, self.adapter)
        for name, w in params.items():
            ok, err, tol = self.close(restored[name], w)
            if not ok:
                self.fail(law, f"unmerge(merge(adapter), adapter)[{name!r}] is off by {err:.3g} from the "
                               "original weight.")
        return None

    def gradients(self):
        law = "gradients reach only the adapter"
        frozen = copy.deepcopy(self.host)
        frozen.requires_grad_(False)
        lora = LoRA(frozen, self.lora.config)
        gen = torch.Generator().manual_seed(self.seed + 1)
        weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) if t.is_floating_point() else None
                   for t in _tensors(self.base_out)]

        def loss_of(out):
            total = 0.0
            for t, w in zip(_tensors(out), weights):
                if w is not None:
                    total = total + (t * w).sum()
            return total

        leaves = optree.tree_map(lambda t: t.detach().clone().requires_grad_(True), self.adapter)
        loss = loss_of(lora(leaves, *self.args))
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            self.fail(law, "the output does not depend on the adapter at all (no gradient path); does "
                           "overlay() detach the factors?")
        loss.backward()
        for leaf, t in leaves[self.key].items():
            if t.grad is None:
                self.fail(law, f"no gradient reaches adapter leaf {leaf!r}; the forward does not use it.")
            if not torch.isfinite(t.grad).all():
                self.fail(law, f"the gradient of adapter leaf {leaf!r} is not finite.")
            if not t.grad.any():
                self.fail(law, f"adapter leaf {leaf!r} gets an all-zero gradient; the forward does not depend on it.")
        leaked = [n for n, p in frozen.named_parameters() if p.grad is not None or p.requires_grad]
        if leaked:
            self.fail(law, f"base parameters {leaked} got gradients (or requires_grad) with the base frozen; "
                           "only the adapter may be trained.")
        if self._merge_skip:
            return None
        again = optree.tree_map(lambda t: t.detach().clone().requires_grad_(True), self.adapter)
        try:
            merged = lora.merge(again)
        except NotImplementedError:
            return None
        loss_of(torch.func.functional_call(frozen, merged, self.args)).backward()
        for leaf, t in leaves[self.key].items():
            ok, err, tol = self.close(t.grad, again[self.key][leaf].grad, grad=True)
            if not ok:
                self.fail(law, f"the gradient of {leaf!r} through lora(adapter, x) differs from the gradient "
                               f"through merge(adapter) by {err:.3g} (tolerance {tol:.3g}); overlay()'s backward "
                               "does not match delta().")
        return None

    def vmap_equals_loop(self):
        law = "vmap over a stack equals the loop"
        adapters = [random_adapter(self.lora, seed=self.seed + 10 + i) for i in range(3)]
        in_dims = (0,) + (None,) * len(self.args)
        try:
            outs = torch.func.vmap(self.lora, in_dims=in_dims)(stack(adapters), *self.args)
        except Exception as e:
            why = _module_cannot_vmap(self.host, self.target, self.args)
            if why:
                return f"the {type(self.target.module).__name__} itself cannot be vmapped: {why}"
            self.fail(law, f"vmap over a stacked adapter fails ({type(e).__name__}: {_first_line(e)}), although "
                           "the module itself can be vmapped; build any tensor subclass inside overlay() and "
                           "avoid Python control flow on factor values.")
        for i, adapter in enumerate(adapters):
            got = optree.tree_map(lambda t: t[i], outs)
            ok, err, tol = self.close(got, self.lora(adapter, *self.args))
            if not ok:
                self.fail(law, f"vmap's output {i} differs from lora(adapter {i}, x) by {err:.3g} (tolerance "
                               f"{tol:.3g}); factors under vmap carry no leading axis for the rule, so index "
                               "from the end (transpose(-2, -1), reshape(..., -1)).")
        return None

    def save_load(self):
        try:
            fio = importlib.import_module("..io", __package__)
        except ImportError as e:
            return f"funclora.io is not available ({e})"
        law = "save/load round-trips"
        with tempfile.TemporaryDirectory() as folder:
            try:
                fio.save_adapter(folder, self.adapter, lora=self.lora)
                loaded, _ = fio.load_adapter(folder, config=self.lora.config, model=self.host)
            except (ValueError, KeyError, OSError) as e:
                keys = {leaf: self.target.rule.file_key(leaf) for leaf in self.adapter[self.key]}
                self.fail(law, f"saving and loading the adapter failed ({type(e).__name__}: {_first_line(e)}); "
                               f"the leaves' file keys are {keys}.")
        if _leaf_names(loaded) != _leaf_names(self.adapter):
            self.fail(law, f"the loaded adapter has leaves {_leaf_names(loaded)}, saved were "
                           f"{_leaf_names(self.adapter)}; check file_key().")
        for (path, leaf), t in _leaves_by_key(self.adapter).items():
            if not torch.equal(t, loaded[path][leaf]):
                self.fail(law, f"leaf {leaf!r} changed in the save → load round trip; check file_key().")
        return None


# --- helpers ----------------------------------------------------------------------------------
def _module_cannot_vmap(host, target, args) -> str | None:
    """Why the module itself cannot be vmapped over stacked weights, or None if it can."""
    names = [f"{target.module_path}.{n}" for n in target.rule.updated_parameters(target.module)]
    stacked = {n: torch.stack([host.get_parameter(n).detach()] * 2) for n in names}
    try:
        torch.func.vmap(lambda p: torch.func.functional_call(host, p, args))(stacked)
    except Exception as e:
        return f"{type(e).__name__}: {_first_line(e)}"
    return None


def snapshot(module):
    return {
        "tree": [(n, type(m).__name__) for n, m in module.named_modules()],
        "modes": {n: m.training for n, m in module.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in module.named_modules()},
        "ids": {n: id(p) for n, p in module.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in module.named_buffers()},
    }


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in optree.tree_leaves(tree, none_is_leaf=False) if isinstance(t, torch.Tensor)]


def _leaves_by_key(adapter):
    return {(p, leaf): t for p, leaves in adapter.items() for leaf, t in leaves.items()}


def _leaf_names(adapter):
    return {p: sorted(leaves) for p, leaves in adapter.items()}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
