"""The demo (the project's main job): it learns, saves PEFT's files, reloads them, and the CLI works."""

import copy
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from funclora.demo import MLP, main, make_data


def test_demo_learns_saves_and_reloads(capsys, tmp_path):
    result = main(["--steps", "60", "--hidden", "256", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "trainable params: 6,818 || all params: 78,500 || trainable%: 8.6854" in out
    assert "before: test loss" in out and "after 60 steps" in out
    assert f"saved the adapter in PEFT's format to {tmp_path}" in out
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert result["after"][0] < 0.5 * result["before"][0]
    assert result["after"][1] > 0.85
    assert result["reload_matches"] and result["merged_matches"] and result["base_unchanged"]
    assert result["out"] == str(tmp_path) and result["trainable"] == 6_818


def test_demo_shows_a_progress_bar(capsys, tmp_path):
    main(["--steps", "3", "--hidden", "16", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "training" in err and "3/3" in err and "loss=" in err


def test_demo_runs_without_tqdm(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    result = main(["--steps", "2", "--hidden", "16", "--out", str(tmp_path)])
    assert "training 2 steps (pip install tqdm for a progress bar)" in capsys.readouterr().out
    assert result["reload_matches"]


def test_demo_default_folder_is_a_new_temporary_one(capsys):
    result = main(["--steps", "1", "--hidden", "16", "--no-progress"])
    try:
        assert os.path.isdir(result["out"]) and os.path.basename(result["out"]).startswith("funclora-demo-")
        assert f"to {result['out']}" in capsys.readouterr().out
    finally:
        shutil.rmtree(result["out"])


def test_the_saved_folder_loads_in_peft(tmp_path):
    """The demo's files are PEFT's: PeftModel.from_pretrained gives funclora's outputs."""
    peft = pytest.importorskip("peft")
    import funclora as fl

    main(["--steps", "5", "--hidden", "64", "--no-progress", "--out", str(tmp_path)])
    torch.manual_seed(0)  # the demo builds its model right after seeding with --seed (0)
    model = MLP(64).eval()
    adapter, config = fl.load_adapter(tmp_path, model=model)
    X, _ = make_data(n=32, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about a custom (non-transformers) model
        reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(X), fl.LoRA(model, config)(adapter, X), atol=1e-5, rtol=1e-5)


def test_demo_timm(capsys, tmp_path):
    pytest.importorskip("timm")
    result = main(["--model", "timm", "--steps", "2", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "trainable params: 267,779 || all params: 11,671,494 || trainable%: 2.2943" in out
    assert "24 LoRA targets" in out and "trained in full: ['head.fc']" in out
    assert result["reload_matches"] and result["merged_matches"] and result["base_unchanged"]


def test_cli(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "funclora", "demo", "--steps", "3", "--hidden", "32",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "trainable params: " in done.stdout and "outputs match: True" in done.stdout
    assert "3/3" in done.stderr  # the progress bar
    assert os.path.exists(tmp_path / "adapter_model.safetensors")
    bad = subprocess.run([sys.executable, "-m", "funclora", "nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "funclora", "demo", "--help"], capture_output=True, text=True,
                           timeout=300)
    assert usage.returncode == 0 and "--model" in usage.stdout and "--out" in usage.stdout
