"""The headline ratios of benchmarks/RESULTS.md as one figure for the Performance page.

Reads the current tables (nothing is re-measured): hessop against the fused
hand-written TensorFlow product (``bench_fused.py``), against curvlinops and
laplace-torch on identical weights (``bench_curvlinops.py``, ``bench_kfac.py``,
``bench_laplace.py``), and the numba kernels against numpy
(``bench_lowrank.py``). A bar left of 1 means hessop takes less time.

    python benchmarks/plot_results.py [--output docs/images/performance.png]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).with_name("RESULTS.md")


def section(text: str, title: str) -> str:
    """The text of the section whose heading starts with ``title``."""
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start : None if end < 0 else end]


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text``, as rows of {header: cell}."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| ]+\|$", lines[i + 1]):
            headers = [h.strip() for h in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                if i + 1 < len(lines) and re.match(r"^\|[-| ]+\|$", lines[i + 1]):
                    break  # the header of the next table, printed right after this one
                rows.append(dict(zip(headers, (c.strip() for c in lines[i].strip("|").split("|")))))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def headline(text: str) -> list[tuple[str, str, float]]:
    """(group, label, hessop time ÷ baseline time) for each headline comparison."""
    out = []
    fused = tables(section(text, "Data-pass products"))[0]
    for row in fused:
        out.append(("fused hand-written TF", f"{row['model']} {row['operator']}", number(row["÷ hand-written"])))
    for row in tables(section(text, "Against curvlinops"))[0]:
        out.append(("PyTorch peers", f"{row['operator']} matvec ÷ curvlinops", number(row["hessop ÷ curvlinops"])))
    kfac = re.search(r"hessop ÷ curvlinops, factor pass: ([0-9.]+)", section(text, "KFAC and EKFAC"))
    if kfac:
        out.append(("PyTorch peers", "KFAC factors ÷ curvlinops", float(kfac.group(1))))
    laplace = section(text, "Laplace and influence at scale")
    for rows in tables(laplace):
        for row in rows:
            if "hessop ÷ laplace-torch" in row:
                out.append(
                    (
                        "PyTorch peers",
                        f"Laplace {row['laplace-torch step (one run)']} ÷ laplace-torch",
                        number(row["hessop ÷ laplace-torch"]),
                    )
                )
    for row in tables(section(text, "Low-rank kernels"))[0]:
        out.append(("numpy", f"numba {row['operation']}", number(row["÷ numpy (medians)"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).parents[1] / "docs" / "images" / "performance.png"))
    args = parser.parse_args()
    items = headline(RESULTS.read_text())
    groups = list(dict.fromkeys(group for group, _, _ in items))
    colours = dict(zip(groups, ("tab:blue", "tab:orange", "tab:green")))
    fig, ax = plt.subplots(figsize=(7.5, 0.26 * len(items) + 1.2))
    positions = range(len(items))[::-1]
    ax.barh(list(positions), [r for _, _, r in items], color=[colours[g] for g, _, _ in items])
    ax.set_yticks(list(positions), [label for _, label, _ in items], fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("hessop time ÷ baseline time (log scale; < 1: hessop faster)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in groups]
    ax.legend(handles, [f"baseline: {g}" for g in groups], fontsize=7, loc="lower left", bbox_to_anchor=(0, 1), ncol=3)
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    for group, label, ratio in items:
        print(f"{group:24s} {label:48s} {ratio:g}")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
