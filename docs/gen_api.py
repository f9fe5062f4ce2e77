"""Write docs/api.md from the docstrings of funclora's public names.

Usage (from the repository root)::

    .venv/bin/python docs/gen_api.py          # rewrite docs/api.md
    .venv/bin/python docs/gen_api.py --check  # exit 1 if docs/api.md is out of date

``tests/test_docs.py`` runs the check, so a docstring change needs a rerun of this script.
Google-style sections (Args, Returns, Raises, Attributes) become bullet lists, doctest examples
become ``pycon`` code blocks, RST double backticks become Markdown code.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import funclora as fl  # noqa: E402
import funclora.testing  # noqa: E402

OUT = os.path.join(HERE, "api.md")

# (section title, intro, [(qualified name, object)])
SECTIONS = [
    ("LoRA on a model", "The config, the resolved LoRA and its pure functions.",
     ["LoraConfig", "LoRA"]),
    ("Adapters as pytrees", "An adapter is `{path: {leaf: Tensor}}`; N adapters stack along a leading axis.",
     ["stack", "select", "unstack"]),
    ("Files in PEFT's format", "", ["save_adapter", "load_adapter", "load_adapters"]),
    ("PEFT's API", "`get_peft_model` returns an `nn.Module` façade; the user's model is never modified.",
     ["get_peft_model", "PeftModel"]),
    ("Targets", "", ["Plan", "Target", "suggest_targets", "TargetSuggestion", "LayerGroup"]),
    ("Rules: LoRA for a layer type", "The rule-writing guide is the docstring of `funclora/rules.py`.",
     ["Rule", "Factor", "ParameterRule", "register_rule", "unregister_rule"]),
    ("Checking rules", "`funclora.testing`; hypothesis strategies are in `funclora.testing.strategies`.",
     ["testing.check_rule", "testing.RuleReport", "RuleCheckError"]),
    ("Strict mode", "", ["strict", "MaterializationError"]),
    ("Errors", "All are `ValueError` subclasses; each message names the function, the path or key, "
     "expected vs found, and the fix.",
     ["TargetNotFoundError", "UnsupportedModuleError", "AdapterMismatchError", "AdapterFileError"]),
]

_SECTION = re.compile(r"^(Args|Arguments|Returns|Raises|Attributes|Yields|Example|Examples)( — .*)?:+$")


def _resolve(name: str):
    obj = fl
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _code(text: str) -> str:
    text = re.sub(r":(?:func|mod|class|meth|attr|data|obj):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _clean(sig: str) -> str:
    """Annotations without the quotes ``from __future__ import annotations`` leaves on them."""
    sig = re.sub(r"(:|->) \"'([^\"]*)'\"", r"\1 \2", sig)
    return re.sub(r"(:|->) '([^']*)'", r"\1 \2", sig)


def _signature(name: str, obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = None
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return f"class fl.{name}({obj.__bases__[0].__name__})"
    if sig is not None and inspect.isclass(obj):
        sig = sig.replace(return_annotation=inspect.Signature.empty)
        if len(sig.parameters) > 12:  # a dataclass with many fields (LoraConfig): they are listed below
            return f"class fl.{name}(**fields)"
    prefix = "class fl." if inspect.isclass(obj) else "fl."
    return prefix + name + _wrap(sig)


def _wrap(sig) -> str:
    """The signature on one line, or one parameter per line when that is long."""
    if sig is None:
        return "(...)"
    text = _clean(str(sig))
    if len(text) <= 90:
        return text
    params = [_clean(str(p)) for p in sig.parameters.values()]
    shown, star = [], False
    for p, param in zip(params, sig.parameters.values()):
        if param.kind is param.KEYWORD_ONLY and not star:
            shown.append("*")
            star = True
        if param.kind is param.VAR_POSITIONAL:
            star = True
        shown.append(p)
    ret = ""
    if sig.return_annotation is not inspect.Signature.empty:
        ret = _clean(str(sig).rsplit(")", 1)[1])
    return "(\n" + "".join(f"    {p},\n" for p in shown) + ")" + ret


def render_doc(doc: str) -> str:
    """A Google-style docstring (already dedented) as Markdown."""
    out: list[str] = []
    lines = doc.splitlines()
    i = 0
    in_code = False
    section = None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(">>>"):
            if not in_code:
                out.append("```pycon")
                in_code = True
            indent = len(line) - len(line.lstrip())
            while i < len(lines) and lines[i].strip():
                out.append(lines[i][indent:] if len(lines[i]) >= indent else lines[i].strip())
                i += 1
            continue
        if in_code:
            out.append("```")
            in_code = False
        m = _SECTION.match(stripped)
        if m and not line.startswith(" "):
            section = m.group(1)
            title = stripped.rstrip(":")
            out.append(f"**{_code(title)}**" + (":" if section not in ("Example", "Examples") else ""))
            out.append("")
            i += 1
            continue
        if section in ("Args", "Arguments", "Returns", "Raises", "Attributes", "Yields") and line.startswith("    "):
            # an entry at indent 4, continuation lines deeper
            entry = [stripped]
            i += 1
            while i < len(lines) and lines[i].startswith("        ") and not lines[i].strip().startswith(">>>"):
                entry.append(lines[i].strip())
                i += 1
            text = " ".join(entry)
            head, sep, rest = text.partition(": ")
            if sep and section != "Returns" and re.fullmatch(r"[\w*, ]+", head):
                names = ", ".join(f"`{h.strip()}`" for h in head.split(","))
                out.append(f"- {names}: {_code(rest)}")
            else:
                out.append(f"- {_code(text)}" if section != "Returns" else _code(text))
            continue
        if not stripped:
            section = section if section in ("Example", "Examples") else None
            out.append("")
        elif line.startswith("    ") and not line.startswith("     " * 2):
            out.append(_code(stripped))
        else:
            out.append(_code(line.rstrip()))
        i += 1
    if in_code:
        out.append("```")
    text = "\n".join(out)
    text = re.sub(r"::\n", ":\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _members(cls) -> list[tuple[str, object, str]]:
    """Public methods and properties defined on ``cls`` itself, in source order."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(value, property):
            out.append((name, value.fget, "property"))
        elif isinstance(value, (classmethod, staticmethod)):
            out.append((name, value.__func__, "classmethod" if isinstance(value, classmethod) else "staticmethod"))
        elif inspect.isfunction(value):
            out.append((name, value, "method"))
    return [(n, f, k) for n, f, k in out if (f.__doc__ or "").strip()]  # own docstrings only


def _method_signature(cls_name: str, name: str, func, kind: str) -> str:
    if kind == "property":
        return f"{cls_name}.{name}"
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    shown = _clean(str(sig.replace(parameters=params)))
    if name == "__call__":
        return f"{cls_name.split('.')[-1].lower()}{shown}"
    return f"{cls_name}.{name}{shown}"


def render() -> str:
    parts = ["# API reference", "",
             "Generated from the docstrings by `docs/gen_api.py` (do not edit by hand). "
             "`import funclora as fl`; every example runs as a doctest in the test suite.", ""]
    parts.append("## Contents\n")
    for title, _, names in SECTIONS:
        anchors = ", ".join(f"[`{n.split('.')[-1]}`](#{_anchor(n)})" for n in names)
        parts.append(f"- **{title}**: {anchors}")
    parts.append("")
    for title, intro, names in SECTIONS:
        parts += [f"## {title}", ""]
        if intro:
            parts += [intro, ""]
        for name in names:
            obj = _resolve(name)
            parts += [f"### {name.split('.')[-1]}", "", f"```python\n{_signature(name, obj)}\n```", ""]
            parts += [render_doc(inspect.getdoc(obj) or ""), ""]
            if inspect.isclass(obj) and not issubclass(obj, BaseException):
                for mname, func, kind in _members(obj):
                    parts += [f"#### `{_method_signature(name, mname, func, kind)}`", ""]
                    parts += [render_doc(inspect.getdoc(func)), ""]
    parts += ["## Other modules", "",
              "- `funclora.distributed`: DDP / FSDP2 helpers, see [distributed.md](distributed.md).",
              "- `funclora.rules`: the built-in rules (`LinearRule`, `ConvRule`, `EmbeddingRule`, "
              "`Conv1DRule`, `MultiheadAttentionRule`), `find_rule`, `supported_types`.",
              "- `funclora.multi.route`, `funclora.multi.combine`: the implementations behind `LoRA.route` and `LoRA.combine` "
              "(their module docstrings describe the algorithms).",
              "- `funclora.core.lazy`: the lazy LoRA weight (`LoraWeight`), see [how_it_works.md](how_it_works.md).",
              "- `funclora.core.default_targets.DEFAULT_TARGETS`: `{model_type: target_modules}`.",
              ""]
    return "\n".join(parts)


def _anchor(name: str) -> str:
    return name.split(".")[-1].lower()


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        try:
            with open(OUT, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = ""
        if current != text:
            print("docs/api.md is out of date: run `.venv/bin/python docs/gen_api.py`", file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
