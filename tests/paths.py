"""Where the tests find this repository and the fixture: its root, tests/data/mnist_small.npz
and that file's sha256."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "mnist_small.npz"
# sha256 of tests/data/mnist_small.npz: the first 1500 training and 500 test images of
# MNIST, derived from the shared full dataset.
FIXTURE_SHA256 = "910df9240d706b7262f7813a543ad99e800ac000fff7f4c69b7f59534782e2f9"
