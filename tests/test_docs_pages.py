"""The pages as a reader sees them: code fits the page width, and the landing page's example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).parents[1] / "docs"
WIDTH = 88  # characters: wider code scrolls sideways on the built site


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```\w*\n(.*?)```", markdown, re.S)


def test_code_shown_in_the_docs_fits_the_page() -> None:
    wide = []
    for page in sorted(DOCS.rglob("*.md")):
        if page.is_relative_to(DOCS / "tutorials"):
            continue  # generated from docs/examples, checked on the built site (test_docs_site.py)
        for block in code_blocks(page.read_text()):
            wide += [f"{page.relative_to(DOCS)}: {line}" for line in block.splitlines() if len(line) > WIDTH]
    for script in sorted((DOCS / "examples").glob("*.py")):  # shown on the tutorial pages
        lines = script.read_text().splitlines()
        wide += [f"{script.relative_to(DOCS)}: {line}" for line in lines if len(line) > WIDTH]
    assert not wide, "\n".join(wide)


def test_the_landing_example_runs_as_written() -> None:
    text = (DOCS / "index.md").read_text()
    example = code_blocks(text[text.index("## A first example") :])[0]
    assert len(example.strip().splitlines()) <= 10
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    values = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", result.stdout)]
    assert len(values) == 5, result.stdout


def test_docstring_examples_fit_the_api_page() -> None:
    """The API page shows each docstring's examples as code: the same width applies."""
    import ast

    wide = []
    for module in sorted((DOCS.parent / "hessop").rglob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for line in (ast.get_docstring(node) or "").splitlines():
                    if line.lstrip().startswith((">>>", "...")) and len(line.strip()) > WIDTH:
                        wide.append(f"{module.relative_to(DOCS.parent)}: {line.strip()}")
    assert not wide, "\n".join(wide)
