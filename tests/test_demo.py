"""The demo (the project's main job) runs, learns, and its CLI works."""

import subprocess
import sys

from funclora.demo import main


def test_demo_learns(capsys):
    result = main(["--steps", "60", "--hidden", "256"])
    out = capsys.readouterr().out
    assert "trainable params:" in out and "before:" in out and "after 60 steps" in out
    assert result["after"][0] < 0.5 * result["before"][0]
    assert result["after"][1] > 0.85 and result["merged_matches"]


def test_cli():
    done = subprocess.run([sys.executable, "-m", "funclora", "demo", "--steps", "3", "--hidden", "32"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trainable params: " in done.stdout
    bad = subprocess.run([sys.executable, "-m", "funclora", "nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
