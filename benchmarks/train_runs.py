"""What the benchmarks that run the train stage share: where full MNIST lies, and the
stage's report read back (how long it trained, on how many images)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist.npz"


def train_seconds(stdout: str) -> float:
    """The training time the train stage reports on its last line."""
    return float(re.search(r"epochs in ([\d.]+)s", stdout).group(1))


def trained_images(stdout: str) -> int:
    """How many images the train stage fitted on (the training set less validation)."""
    return int(re.search(r" on (\d+) images", stdout).group(1))
