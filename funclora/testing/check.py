"""``check_rule``: run the laws of :mod:`funclora.testing.laws` on a rule applied to one module."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ..core.registry import as_rule, find_rule
from ..core.rules import ParameterRule, Rule
from ..errors import RuleCheckError, UnsupportedModuleError
from ..lora import LoRA
from .inputs import build_module, host_config, random_adapter, resolve_inputs
from .laws import LAWS, LawRun, snapshot

__all__ = ["RuleReport", "check_rule"]


@dataclass
class RuleReport:
    """What :func:`check_rule` checked: ``checked`` laws held, ``skipped`` maps law → reason.

    Example:
        >>> import torch
        >>> from funclora.testing import check_rule
        >>> report = check_rule(lambda: torch.nn.Linear(4, 3))
        >>> report.rule, len(report.checked), report.skipped
        ('LinearRule()', 8, {})
    """

    module: str
    rule: str
    checked: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self):
        lines = [f"check_rule: {self.rule} on {self.module}"]
        lines += [f"  ok       {law}" for law in self.checked]
        lines += [f"  skipped  {law}: {why}" for law, why in self.skipped.items()]
        return "\n".join(lines)


class _Host(nn.Module):
    """Holds the module under test as ``layer`` so that it has a path LoRA can target."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return self.layer(*args, **kwargs)


def check_rule(module_factory, rule: Rule | type | None = None, *, inputs=None, r: int = 4,
               seed: int = 0, atol: float = 1e-5, rtol: float = 1e-4,
               laws: Iterable[str] | None = None) -> RuleReport:
    """Run the laws every LoRA rule must keep on ``rule`` applied to one module.

    Args:
        module_factory: a callable returning a fresh module (called once, under
            ``torch.manual_seed(seed)``), or a module (deep-copied; yours is never changed).
        rule: the rule to check (a :class:`~funclora.Rule` or a Rule subclass). ``None``: the rule
            funclora would pick for this module type. A plain ``ParameterRule("weight_ih_l0")``
            is checked through ``target_parameters``.
        inputs: positional arguments of the module's forward: a tensor, a tuple, or a callable
            ``module -> tuple``. ``None`` guesses them for nn.Linear / Conv / Embedding /
            MultiheadAttention / LSTM / GRU / RNN and transformers Conv1D.
        r: the rank (with ``lora_alpha = 2·r``, so the scaling is 2).
        atol, rtol: outputs agree when ``max|a − b| ≤ atol + rtol·max|b|``.
        laws: check only these (names in :data:`LAWS`); default all.

    Returns:
        A :class:`RuleReport` with the laws checked and those skipped (with the reason).

    Raises:
        RuleCheckError: the first broken law, its name in ``.law``, what went wrong in words.
        UnsupportedModuleError: the rule's ``check`` refuses this module (e.g. ``r`` not
            divisible by a conv's ``groups``), or no rule exists for it and ``rule`` is None.

    Example:
        >>> import torch, funclora as fl
        >>> from funclora.testing import check_rule
        >>> report = check_rule(lambda: torch.nn.Linear(4, 3))
        >>> "merge equals apply" in report.checked
        True
    """
    wanted = tuple(LAWS if laws is None else laws)
    unknown = [law for law in wanted if law not in LAWS]
    if unknown:
        raise ValueError(f"check_rule: unknown law(s) {unknown}; the laws are {list(LAWS)}.")
    module = build_module(module_factory, seed)
    module.eval()  # dropout inside the module would make outputs random
    rule = _rule_for(module, rule)
    subject = f"{rule!r} on {type(module).__name__}"
    args = resolve_inputs(module, inputs, seed)
    host = _Host(module)
    config = host_config(module, rule, r)
    before = snapshot(host)
    try:
        lora = LoRA(host, config)
    except UnsupportedModuleError:
        raise
    except Exception as e:
        raise RuleCheckError("well-formed", subject, f"building the LoRA failed: {type(e).__name__}: {e}") from e
    key = next(iter(lora.plan.targets))
    target = lora.plan.targets[key]
    run = LawRun(host, lora, target, args, subject, seed, atol, rtol)
    run.static()  # the other laws need a well-formed rule
    run.adapter = random_adapter(lora, seed=seed)
    report = RuleReport(module=type(module).__name__, rule=repr(rule))
    _run_laws(run, wanted, before, report)
    return report


def _rule_for(module: nn.Module, rule) -> Rule:
    """The rule to check: ``rule``, or the one funclora would pick; refuses what cannot be checked."""
    if rule is None:
        rule = find_rule(module)
        if rule is None:
            raise UnsupportedModuleError(
                f"check_rule: {type(module).__name__} has no LoRA rule; pass the rule to check "
                "(check_rule(factory, MyRule()))."
            )
    else:
        rule = as_rule(rule, type(module))
    if type(rule) is ParameterRule and rule.name not in dict(module.named_parameters(recurse=False)):
        own = [n for n, _ in module.named_parameters(recurse=False)]
        raise ValueError(f"check_rule: {rule!r} on {type(module).__name__}: the module has no parameter "
                         f"{rule.name!r}; its own parameters are {own}.")
    return rule


def _run_laws(run: LawRun, wanted: tuple, before, report: RuleReport) -> None:
    """Check each wanted law in :data:`LAWS` order, noting it as checked or skipped (with why)."""
    for law in LAWS:
        if law not in wanted:
            continue
        if law == "module unchanged":
            run.exercise()
            run.unchanged(before)
            report.checked.append(law)
            continue
        why = getattr(run, _METHODS[law])()
        if why:
            report.skipped[law] = why
        else:
            report.checked.append(law)
    if "module unchanged" in wanted:
        run.unchanged(before)


_METHODS = {
    "well-formed": "well_formed",
    "fresh adapter is a no-op": "fresh_is_noop",
    "adapter changes the output": "changes_output",
    "merge equals apply": "merge_equals_apply",
    "gradients reach only the adapter": "gradients",
    "vmap over a stack equals the loop": "vmap_equals_loop",
    "save/load round-trips": "save_load",
}
