"""The built site as a reader sees it: every tutorial ran, shows its figures and output, and fits the page.

Building the site runs every script in docs/examples (mkdocs-gallery), so
these tests are where the tutorials run in the test suite. `.ci/run` builds
the site strictly before the tests and passes it in ``HESSOP_DOCS_SITE``;
without it, the fixture builds a copy of the docs from scratch (about two
minutes on two cores), so no cached page stands in for a script that no
longer runs.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

pytestmark = pytest.mark.xdist_group("site")  # one worker builds the site once

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "docs" / "examples").glob("*.py"))
WIDTH = 88  # characters: wider lines scroll sideways on the page

# What each page must show in its printed output.
EXPECTED = {
    "cnn_spectrum": ["eigenvalue 1:", "spectral density", "trace (Hutch++"],
    "logistic_standard_errors": ["Newton converged", "Robust (sandwich", "std.err"],
    "laplace_mlp": ["optimised prior precision", "predictive sd"],
    "opg_ggn_hessian": ["OPG (ipca)", "relative gap"],
    "influence_points": ["most helpful", "leave-one-out change", "Pearson correlation"],
    "structured_cnn": ["relative Frobenius error", "top eigenvalue per layer", "log det"],
    "laplace_cnn": ["last layer: P = 330", "prior precision by validation NLL", "LA evidence τ, noisy"],
    "influence_images": ["most helpful training labels", "EK-FAC", "gradient products"],
    "evidence_training": ["prior precision τ", "τ tuned by the evidence"],
    "transformer_curvature": ["top-5 eigenvalues", "spectral density", "attention/value"],
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("HESSOP_DOCS_SITE")
    if given:
        return Path(given)
    work = tmp_path_factory.mktemp("docs")
    shutil.copy(ROOT / "mkdocs.yml", work)
    shutil.copytree(ROOT / "docs", work / "docs", ignore=shutil.ignore_patterns("tutorials", "__pycache__"))
    (work / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", work / "benchmarks")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(work / "site")]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    return work / "site"


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def _images(page: Path) -> list[Path]:
    sources = re.findall(r'<img[^>]*\ssrc="([^"]+)"', page.read_text())
    return [(page.parent / unquote(src)).resolve() for src in sources if not src.startswith(("http:", "https:", "data:"))]


def test_the_gallery_has_a_thumbnail_for_each_tutorial(site: Path) -> None:
    assert set(EXPECTED) == set(SCRIPTS), "each script in docs/examples needs its EXPECTED output here"
    index = site / "tutorials" / "index.html"
    images = _images(index)
    for script in SCRIPTS:
        thumbs = [p for p in images if p.name == f"mkd_glr_{script}_thumb.png"]
        assert thumbs and thumbs[0].stat().st_size > 2_000, f"{script}: no thumbnail"
        assert f'href="{script}/"' in index.read_text(), f"{script}: not linked from the gallery"


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_tutorial_page_shows_its_output_and_figures(site: Path, script: str) -> None:
    page = site / "tutorials" / script / "index.html"
    text = page.read_text()
    figures = [p for p in _images(page) if p.name.startswith(f"mkd_glr_{script}_")]
    assert figures, f"{script}: no figure on the page"
    for figure in figures:
        assert figure.is_file() and figure.stat().st_size > 10_000, figure
    outputs = "\n".join(_text(block) for block in re.findall(r"mkd-glr-script-out-disp[^>]*>(.*?)</div>", text, re.S))
    for expected in EXPECTED.get(script, []):
        assert expected in outputs, (script, expected, outputs[-2000:])
    for sign in ("Traceback", "Warning", "WARNING"):
        assert sign not in outputs, (script, outputs)


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_line_on_a_tutorial_page_is_wider_than_the_page(site: Path, script: str) -> None:
    page = (site / "tutorials" / script / "index.html").read_text()
    blocks = [_text(block) for block in re.findall(r"<pre[^>]*>(.*?)</pre>", page, re.S)]
    assert blocks
    wide = [line for block in blocks for line in block.splitlines() if len(line) > WIDTH]
    assert not wide, "\n".join(wide)
