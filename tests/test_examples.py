"""The runnable examples run: examples/warp_demo.py whole, examples/joint_steps.py for two steps."""

import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_warp_demo_runs(capsys):
    runpy.run_path(str(EXAMPLES / "warp_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "warp forward+backward" in out and "grid_sample drop-in" in out


def test_joint_steps_runs_and_scores(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["joint_steps.py"])
    namespace = runpy.run_path(str(EXAMPLES / "joint_steps.py"))
    namespace["main"](steps=2)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["step  0", "step  1"]
    assert lines[2].startswith("registration Dice") and "segmentation Dice of the fixed image" in lines[2]
