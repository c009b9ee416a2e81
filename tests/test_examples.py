"""The demo command and the README's example run as documented (the tutorials: tests/test_docs_site.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def test_demo_cli(tmp_path):
    picture = tmp_path / "spectrum.png"
    result = subprocess.run(
        [sys.executable, "-m", "hessop", "demo", "--epochs", "3", "--hidden", "8", "--output", str(picture)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("eigenvalue") >= 5
    assert "trace estimate" in result.stdout and "spectral density" in result.stdout
    assert picture.stat().st_size > 10_000
    help_text = subprocess.run([sys.executable, "-m", "hessop", "demo", "--help"], capture_output=True, text=True).stdout
    for option in ("--hidden", "--k", "--batch-size", "--output"):
        assert option in help_text


def test_demo_arguments_are_checked_before_training(tmp_path, capsys):
    from hessop.__main__ import build_parser

    for argv, message in [
        (["demo", "--k", "0"], "argument --k: expected a positive integer, got 0"),
        (["demo", "--output", str(tmp_path / "missing" / "x.png")], "argument --output: expected a file in an existing folder"),
    ]:
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(argv)
        assert exited.value.code == 2 and message in capsys.readouterr().err
    assert build_parser().parse_args(["demo", "--output", str(tmp_path / "x.png")]).output == str(tmp_path / "x.png")


def test_readme_example_runs_and_converges():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("## Example\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["info"] == 0  # cg converged
    assert len(namespace["top_values"]) == 5 and np.all(np.isfinite(namespace["step"]))
    assert max(len(line) for line in code.splitlines()) <= 88
