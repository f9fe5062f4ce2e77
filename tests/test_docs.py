"""README and docs/: the setup commands, the code blocks run, the links resolve, the API page is current."""

import inspect
import os
import re
import subprocess
import sys

import pytest

import funclora as fl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = 'python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e ".[test]"'
DEMO = SETUP + " && .venv/bin/python -m funclora demo"
TESTS = SETUP + " && .venv/bin/python -m pytest -q"


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _blocks(text, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_commands_are_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = _read("README.md")
    assert _blocks(readme, "bash")[:2] == [DEMO + "\n", TESTS + "\n"]
    assert readme.index(DEMO) < readme.index("## Quickstart")  # on the first screen
    assert TESTS in _read(".ci", "run").splitlines()


def test_readme_quickstart_fits_in_20_lines():
    quickstart = _read("README.md").split("## Quickstart", 1)[1]
    assert len(_blocks(quickstart, "python")[0].strip().splitlines()) <= 20


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    """Every ```python block of the README, in order, in one namespace (they build on each other)."""
    monkeypatch.chdir(tmp_path)  # the quickstart saves "my-adapter/" in the working directory
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(_blocks(_read("README.md"), "python")):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message says which block
            raise AssertionError(f"README.md python block {i} fails: {type(e).__name__}: {e}\n{block}") from e
    out = capsys.readouterr().out
    # the numbers the README states in comments are the ones printed
    assert "trainable params: 52,162 || all params: 4,100,164 || trainable%: 1.2722" in out
    assert "trainable params: 1,062,147 || all params: 56,467,974 || trainable%: 1.8810" in out
    assert "['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj'," in out
    assert "ok       merge equals apply" in out  # check_rule's report on the README's LSTM rule
    assert os.path.exists(tmp_path / "my-adapter" / "adapter_model.safetensors")
    assert tuple(namespace["outs"].shape) == (4, 32, 2) and tuple(namespace["routed"].shape) == (32, 2)
    assert namespace["mixed_config"].r == 16


def _links(text):
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+://", target) and not target.startswith("#"):
            yield target.split("#", 1)[0]


@pytest.mark.parametrize("doc", ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(
    os.path.join(ROOT, "docs"))) if f.endswith(".md")])
def test_relative_links_resolve(doc):
    base = os.path.dirname(os.path.join(ROOT, doc))
    missing = [t for t in _links(_read(doc)) if not os.path.exists(os.path.normpath(os.path.join(base, t)))]
    assert not missing, f"{doc} links to missing files: {missing}"


def test_api_page_is_current():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "gen_api.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_every_public_name_has_a_runnable_example():
    missing = [name for name in fl.__all__ if not inspect.ismodule(getattr(fl, name))
               and ">>>" not in (inspect.getdoc(getattr(fl, name)) or "")]
    assert not missing, f"public names without a docstring example: {missing}"
