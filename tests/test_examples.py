"""The tutorial scripts in docs/examples run and print what their pages promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).parents[1] / "docs" / "examples"

EXPECTED = {
    "cnn_spectrum.py": ["eigenvalue 1:", "spectral density", "trace", "cnn_spectrum.png"],
    "logistic_standard_errors.py": ["Newton converged", "Robust (sandwich", "std.err"],
    "laplace_mlp.py": ["optimised prior precision", "predictive sd", "laplace_mlp.png"],
    "opg_ggn_hessian.py": ["Hessian", "GGN", "OPG (ipca, one pass)", "relative gap"],
    "influence_points.py": ["most helpful", "leave-one-out change"],
    "structured_cnn.py": ["relative Frobenius error", "top eigenvalue per layer", "inverse quality"],
    "laplace_cnn.py": ["last layer: P = 330", "prior precision by validation NLL", "LA evidence τ, noisy", "laplace_cnn.png"],
    "influence_images.py": ["most helpful training labels", "EK-FAC", "gradient products", "influence_images.png"],
    "evidence_training.py": ["prior precision τ", "τ tuned by the evidence", "evidence_training.png"],
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_tutorial_runs(script, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLES,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for text in EXPECTED[script]:
        assert text in result.stdout, (text, result.stdout[-2000:])
    for picture in [t for t in EXPECTED[script] if t.endswith(".png")]:
        assert (tmp_path / picture).stat().st_size > 10_000


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
