"""``suggest_targets``: which layers of a model to give LoRA, when no table knows the model.

Every ``nn.Linear`` / transformers ``Conv1D`` (and ``nn.MultiheadAttention``) is given a role
from its name and position:

=========  ==============================================================================
role       how it is recognised
=========  ==============================================================================
``q``      name token ``q`` / ``query`` / ``wq`` (``q_proj``, ``query``, ``to_q``, ``q``)
``k``      name token ``k`` / ``key`` / ``wk``
``v``      name token ``v`` / ``value`` / ``wv``
``qkv``    a fused projection: ``qkv_proj``, ``query_key_value``, ``c_attn``, ``Wqkv``,
           ``W_pack``, ``kv_proj``, ``in_proj`` inside an attention module; also a whole
           ``nn.MultiheadAttention`` (its LoRA rule adapts in_proj and out_proj; its inner
           ``out_proj`` is not listed: MHA's forward reads that weight directly)
``o``      any other linear inside an attention module (a parent named ``*attn*`` /
           ``*attention*``, or a sibling of a q/k/v layer): ``o_proj``, ``out_proj``, ``dense``
``mlp``    any other linear inside a numbered block (``layers.3.mlp.up_proj``, ``layer.1.fc1``)
``head``   the output head: ``get_output_embeddings()`` of a transformers model, else a
           top-level ``lm_head`` / ``head`` / ``classifier`` / ``score`` / ...
``other``  the rest (poolers, projections outside the blocks, a plain MLP's layers)
=========  ==============================================================================

Within a role the layers are grouped by the shortest dotted suffix (with at least one
non-numeric part: ``ff.2``, not ``2``) that matches exactly those layers under PEFT's list
rule (a module path equals the entry or ends with ``"." + entry``), so each group's
``entry`` can be put in ``target_modules`` as it is. When
no suffix separates a group from layers of another role (BERT's ``layer.0.output.dense`` vs
``layer.0.attention.output.dense``), the entry is a regex over the whole path instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ._kinds import is_linear, is_pretrained, name_match

__all__ = ["LayerGroup", "TargetSuggestion", "suggest_targets"]

ROLES = ("q", "k", "v", "qkv", "o", "mlp", "head", "other")
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
_ROLE_TITLES = {"q": "attention query", "k": "attention key", "v": "attention value",
                "qkv": "attention fused q/k/v", "o": "attention output", "mlp": "MLP",
                "head": "output head", "other": "other"}

_Q, _K, _V = {"q", "query", "wq", "toq"}, {"k", "key", "wk", "tok"}, {"v", "value", "wv", "tov"}
_FUSED = re.compile(r"qkv|query_key_value|^c_attn$|^w_pack$|^kv(_|$)|^wkv$", re.IGNORECASE)
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_HEADS = {"lm_head", "head", "heads", "classifier", "score", "qa_outputs", "embed_out", "output_layer",
          "logits", "fc_out", "output_projection", "cls_head", "lm_head_linear"}


@dataclass(frozen=True)
class LayerGroup:
    """Linear layers that share one role and one ``target_modules`` entry.

    Attributes:
        entry: the ``target_modules`` list entry (a dotted suffix) that matches exactly
            ``paths``; or, if ``regex``, a regex that full-matches exactly ``paths``.
        role: one of ``q k v qkv o mlp head other``.
        paths: the module paths, in ``named_modules`` order.
        kind: the layers' class name(s), e.g. ``"Linear"`` or ``"Conv1D"``.
        shape: ``(in_features, out_features)`` of the first layer.
        regex: whether ``entry`` is a regex rather than a suffix.

    Example:
        >>> import torch, funclora as fl
        >>> class Attention(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.q_proj, self.v_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        >>> model = torch.nn.Module()
        >>> model.layers = torch.nn.ModuleList([Attention(), Attention()])
        >>> fl.suggest_targets(model).groups[0]
        LayerGroup(entry='q_proj', role='q', paths=('layers.0.q_proj', 'layers.1.q_proj'), kind='Linear', shape=(8, 8), regex=False)
    """

    entry: str
    role: str
    paths: tuple[str, ...]
    kind: str
    shape: tuple[int, int]
    regex: bool = False

    def __str__(self):
        entry = f"regex {self.entry!r}" if self.regex else repr(self.entry)
        n = len(self.paths)
        return (f"{entry:<28} {n:>3} × {self.kind} {self.shape[0]}→{self.shape[1]}  "
                f"e.g. {self.paths[0]}" + (f" … {self.paths[-1]}" if n > 1 else ""))


@dataclass(frozen=True)
class TargetSuggestion:
    """What :func:`suggest_targets` found: the model's linear layers by role.

    Attributes:
        groups: every :class:`LayerGroup`, attention roles first (q, k, v, qkv, o), then mlp,
            head, other.
        target_modules: a suggested ``target_modules`` value (PEFT's habit: the attention query
            and value projections, or the fused qkv projection); ``None`` if the model has no
            linear layer.
        model_type: ``config.model_type`` of a transformers model, else ``None``.

    Example:
        >>> import torch, funclora as fl
        >>> class Attention(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.q_proj, self.v_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        >>> model = torch.nn.Module()
        >>> model.layers = torch.nn.ModuleList([Attention(), Attention()])
        >>> model.lm_head = torch.nn.Linear(8, 50)
        >>> suggestion = fl.suggest_targets(model)
        >>> print(suggestion)
          attention query (q):
            'q_proj'                       2 × Linear 8→8  e.g. layers.0.q_proj … layers.1.q_proj
          attention value (v):
            'v_proj'                       2 × Linear 8→8  e.g. layers.0.v_proj … layers.1.v_proj
          output head (head):
            'lm_head'                      1 × Linear 8→50  e.g. lm_head
          suggested: target_modules=['q_proj', 'v_proj']
        >>> suggestion.roles
        {'q': ['q_proj'], 'v': ['v_proj'], 'head': ['lm_head']}
    """

    groups: tuple[LayerGroup, ...]
    target_modules: list[str] | str | None
    model_type: str | None = None

    @property
    def roles(self) -> dict[str, list[str]]:
        """``{role: [entry, ...]}`` for every role that has layers, attention roles first."""
        out: dict[str, list[str]] = {}
        for g in self.groups:
            out.setdefault(g.role, []).append(g.entry)
        return out

    @property
    def attention(self) -> dict[str, list[str]]:
        """``{role: entries}`` for the attention roles ``q k v qkv o`` that the model has."""
        return {r: e for r, e in self.roles.items() if r in ATTENTION_ROLES}

    @property
    def mlp(self) -> list[str]:
        """Entries of the MLP / feed-forward linear layers."""
        return self.roles.get("mlp", [])

    @property
    def head(self) -> list[str]:
        """Entries of the output head (``lm_head``, ``classifier``, ...)."""
        return self.roles.get("head", [])

    @property
    def other(self) -> list[str]:
        """Entries of linear layers with no recognised role."""
        return self.roles.get("other", [])

    def entries(self, *roles: str) -> list[str] | str:
        """A ``target_modules`` value covering exactly the layers of ``roles``.

        A list of suffixes when every group has one, else one regex for all of them.

        Example:
            >>> import torch, funclora as fl
            >>> model = torch.nn.Module()
            >>> names = ("q_proj", "k_proj", "v_proj", "o_proj")
            >>> model.attn = torch.nn.ModuleDict({n: torch.nn.Linear(4, 4) for n in names})
            >>> fl.suggest_targets(model).entries("q", "k", "v", "o")
            ['q_proj', 'k_proj', 'v_proj', 'o_proj']
        """
        unknown = [r for r in roles if r not in ROLES]
        if unknown:
            raise ValueError(f"TargetSuggestion.entries: unknown roles {unknown}; roles are {list(ROLES)}.")
        return _combine([g for g in self.groups if g.role in roles])

    def __str__(self):
        if not self.groups:
            return "no nn.Linear / Conv1D layers"
        lines, role = [], None
        for g in self.groups:
            if g.role != role:
                role = g.role
                lines.append(f"  {_ROLE_TITLES[role]} ({role}):")
            lines.append(f"    {g}")
        lines.append(f"  suggested: target_modules={self.target_modules!r}")
        return "\n".join(lines)


def suggest_targets(model: nn.Module) -> TargetSuggestion:
    """Group ``model``'s linear layers by role and suggest a ``target_modules`` value.

    The same analysis backs the error LoRA raises for ``target_modules=None`` on a model whose
    ``config.model_type`` has no default targets. It never changes the model.

    Args:
        model: any ``nn.Module``.

    Returns:
        A :class:`TargetSuggestion`; ``print`` it for a table, read ``.roles`` /
        ``.attention`` / ``.mlp`` / ``.head`` for the entries, ``.target_modules`` for the
        suggestion, ``.entries("q", "v", "mlp")`` for a custom mix.

    Example:
        >>> import torch, funclora as fl
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attn = torch.nn.ModuleDict({n: torch.nn.Linear(8, 8) for n in ("wq", "wk", "wv", "wo")})
        ...         self.ffn = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
        >>> model = torch.nn.Module()
        >>> model.blocks = torch.nn.ModuleList([Block(), Block()])
        >>> model.lm_head = torch.nn.Linear(8, 100)
        >>> s = fl.suggest_targets(model)
        >>> s.attention
        {'q': ['wq'], 'k': ['wk'], 'v': ['wv'], 'o': ['wo']}
        >>> s.mlp, s.head, s.target_modules
        (['ffn.0', 'ffn.1'], ['lm_head'], ['wq', 'wv'])
    """
    names = tuple(n for n, _ in model.named_modules() if n)
    mha = [n for n, m in model.named_modules() if n and isinstance(m, nn.MultiheadAttention)]
    linear = [(n, m) for n, m in model.named_modules() if n and (
        isinstance(m, nn.MultiheadAttention) or is_linear(m) and not any(n.startswith(a + ".") for a in mha))]
    head_ids = set()
    if is_pretrained(model):
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
        if head is not None:
            head_ids.add(id(head))
    roles = _assign_roles(linear, head_ids)
    by_role: dict[str, list[tuple[str, nn.Module]]] = {r: [] for r in ROLES}
    for (path, module), role in zip(linear, roles):
        by_role[role].append((path, module))
    groups: list[LayerGroup] = []
    for role in ROLES:
        members = by_role[role]
        if members:
            groups += _group(role, members, names)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return TargetSuggestion(tuple(groups), _suggest(groups), model_type if isinstance(model_type, str) else None)


# --- roles ------------------------------------------------------------------------------------
def _tokens(name: str) -> set[str]:
    return {t for t in re.split(r"[^a-z0-9]+", name.lower()) if t}


def _qkv_role(name: str, parents: list[str]) -> str | None:
    if _FUSED.search(name) or (name.lower() == "in_proj" and any(_ATTENTION.search(p) for p in parents)):
        return "qkv"
    tokens = _tokens(name)
    hits = [r for r, words in (("q", _Q), ("k", _K), ("v", _V)) if tokens & words]
    if len(hits) > 1:
        return "qkv"
    return hits[0] if hits else None


def _assign_roles(linear, head_ids) -> list[str]:
    parts = [path.split(".") for path, _ in linear]
    first = [_qkv_role(p[-1], p[:-1]) for p in parts]
    qkv_parents = {".".join(p[:-1]) for p, r in zip(parts, first) if r}
    roles = []
    for (path, module), p, role in zip(linear, parts, first):
        parents, name = p[:-1], p[-1]
        in_block = any(s.isdigit() for s in parents)
        if isinstance(module, nn.MultiheadAttention):
            roles.append("qkv")  # its own LoRA rule adapts in_proj and out_proj together
        elif id(module) in head_ids or (not head_ids and not in_block and name.lower() in _HEADS):
            roles.append("head")
        elif role:
            roles.append(role)
        elif ".".join(parents) in qkv_parents or any(_ATTENTION.search(s) for s in parents):
            roles.append("o")
        elif in_block:
            roles.append("mlp")
        else:
            roles.append("other")
    return roles


# --- entries ----------------------------------------------------------------------------------
def _names_matching(entry: str, names) -> set[str]:
    return {n for n in names if name_match(n, [entry])}


def _local(path: str) -> list[str]:
    """The path below its last numbered parent (``model.layers.3.mlp.up`` → ``mlp.up``)."""
    parts = path.split(".")
    cut = max((i + 1 for i, s in enumerate(parts[:-1]) if s.isdigit()), default=0)
    return parts[cut:]


def _path_regex(path: str) -> str:
    return r"\.".join(r"\d+" if s.isdigit() else re.escape(s) for s in path.split("."))


def _group(role: str, members, names) -> list[LayerGroup]:
    """Split one role's layers into groups, each with an entry that matches exactly them."""
    allowed = {p for p, _ in members}
    modules = dict(members)
    entry_of: dict[str, tuple[str, bool]] = {}
    for path, _ in members:
        if path in entry_of:
            continue
        local = _local(path)
        words = [i for i, part in enumerate(local) if not part.isdigit()]
        for i in range(words[-1] if words else -1, -1, -1):  # 'ff.2' rather than a bare '2'
            entry = ".".join(local[i:])
            hit = _names_matching(entry, names)
            if path in hit and hit <= allowed:
                for p in hit:
                    entry_of.setdefault(p, (entry, False))
                break
        else:
            rx = _path_regex(path)
            hit = {n for n in names if re.fullmatch(rx, n)}
            entry, is_rx = (rx, True) if hit <= allowed else (path, False)
            for p in (hit if is_rx else {path}):
                entry_of.setdefault(p, (entry, is_rx))
    grouped: dict[tuple[str, bool], list[str]] = {}
    for path, _ in members:
        grouped.setdefault(entry_of[path], []).append(path)
    out = []
    for (entry, is_rx), paths in grouped.items():
        kinds = list(dict.fromkeys(type(modules[p]).__name__ for p in paths))
        out.append(LayerGroup(entry, role, tuple(paths), "/".join(kinds), _io(modules[paths[0]]), is_rx))
    return out


def _io(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, 3 * module.embed_dim
    w = module.weight  # transformers Conv1D stores (in, out)
    return int(w.shape[0]), int(w.shape[1])


def _combine(groups) -> list[str] | str:
    if not any(g.regex for g in groups):
        return list(dict.fromkeys(g.entry for g in groups))
    alternatives = [g.entry if g.regex else rf"(?:.*\.)?{re.escape(g.entry)}" for g in groups]
    return "(?:" + "|".join(dict.fromkeys(alternatives)) + ")"


def _suggest(groups) -> list[str] | str | None:
    """PEFT's habit: the query and value projections (and fused qkv ones), else every attention
    projection, else every linear layer outside the head, else the head."""
    present = {g.role for g in groups}
    for wanted in (("q", "v", "qkv"), ATTENTION_ROLES, ("mlp", "other"), ("head",)):
        if present & set(wanted):
            return _combine([g for g in groups if g.role in wanted])
    return None
