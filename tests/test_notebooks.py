"""The notebooks in notebooks/ are stored clean and run top to bottom (nbclient, a fresh kernel each)."""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NAMES = ["01_mlp", "02_timm", "03_transformers", "04_custom_layer", "05_many_adapters", "06_qlora", "07_trainer"]

# What each story must show when it runs (a line of its text output), besides its plots.
EXPECTED = {
    "01_mlp": ["trainable params: 52,162 || all params: 4,100,164 || trainable%: 1.2722",
               "merged == LoRA forward: True", "base weights unchanged: True"],
    "02_timm": ["trainable params: 1,062,147 || all params: 56,467,974 || trainable%: 1.8810",
                "merged == LoRA forward: True", "the model's own weights are unchanged: True"],
    "03_transformers": ["max |funclora - PEFT| = 0.0", "PEFT's files through funclora, max |diff| = 0.0",
                        "has no default targets"],
    "04_custom_layer": ["has no LoRA rule", "law 'well-formed' is broken", "same outputs after reloading: True",
                        "the original model was never modified: True", "route == one adapter per example: True"],
    "05_many_adapters": ["route == one adapter per example: True", "funclora route"],
    "06_qlora": ["PEFT's q_proj: peft.tuners.lora.bnb.Linear4bit", "equal to PEFT: True",
                 "the quantized model is unchanged: True"],
    "07_trainer": ["eval_loss fell: True", "PEFT reads the folder: True", "the adapter knows the colours: True",
                   "reloaded == trained: True", "the base model is unchanged: True"],
}


def test_every_notebook_is_listed():
    found = sorted(f[:-len(".ipynb")] for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb"))
    assert found == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    with open(os.path.join(NOTEBOOKS, name + ".ipynb")) as f:
        nb = json.load(f)
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{name}: cells {dirty} carry outputs; clear them before committing"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, monkeypatch):
    # one thread in the kernel: a notebook is small, and oversubscribed cores slow it down many times
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(os.path.join(NOTEBOOKS, name + ".ipynb"), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()  # raises CellExecutionError naming the cell if any cell fails
    text = "".join(_text(c) for c in nb.cells if c.cell_type == "code")
    for line in EXPECTED[name]:
        assert line in text, f"{name}: expected {line!r} in the outputs"
    images = sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for out in c.get("outputs", []))
    assert images >= 1, f"{name}: no plot was drawn"
