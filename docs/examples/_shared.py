"""Helpers shared by the tutorial scripts: output folder and quiet TensorFlow."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def output_dir(description: str) -> Path:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--output", default=".", help="folder for pictures (default: current folder)"
    )
    path = Path(parser.parse_args().output)
    path.mkdir(parents=True, exist_ok=True)
    return path
