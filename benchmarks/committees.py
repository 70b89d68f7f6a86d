"""Committees of every size k out of N experiments, all C(N, k) of them: how many test errors
a committee of k makes on average, and at best and worst, against one member.

    python -m benchmarks.committees --k 3 5 -- exp-1 exp-2 ... exp-10   (in the project)

Each experiment's test probabilities are read through DVC as `mnist-committee` reads them
(nothing retrains), combined by its rule (the mean). Prints one JSON line per k; with
--sets, also the committees of the consecutive, disjoint groups of k in the order given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from mnist_cli import revisions
from mnist_cli.committee import combine, evaluated_together
from mnist_cli.errors_diff import predictions

MAX_SUBSETS = 100_000  # C(10, 5) is 252; C(20, 10) would be 184,756


def errors_of(y: np.ndarray, members: list[np.ndarray]) -> int:
    return int((combine(members).argmax(axis=1) != y).sum())


def subsets(y: np.ndarray, probabilities: list[np.ndarray], k: int) -> dict:
    """Errors of every committee of k members: mean, min, max and how many."""
    chosen = list(itertools.combinations(range(len(probabilities)), k))
    if len(chosen) > MAX_SUBSETS:
        raise SystemExit(f"error: C({len(probabilities)}, {k}) = {len(chosen)} committees, "
                         f"more than {MAX_SUBSETS}")
    errors = [errors_of(y, [probabilities[i] for i in c]) for c in chosen]
    return {"k": k, "committees": len(errors), "mean_errors": statistics.mean(errors),
            "min": min(errors), "max": max(errors)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", required=True)
    parser.add_argument("--sets", action="store_true",
                        help="also the disjoint groups of k, in the order given")
    parser.add_argument("members", nargs="+", metavar="REV")
    args = parser.parse_args(argv)
    paths = evaluated_together(args.members)
    with tempfile.TemporaryDirectory(prefix="mnist-committees-") as scratch:
        y = revisions.read_npz(paths[0]["raw"], args.members[0],
                               ("x_train", "y_train", "x_test", "y_test"), Path(scratch),
                               only=("y_test",))["y_test"].astype(np.int64)
        probabilities = [predictions(p, rev, Path(scratch), len(y))
                         for p, rev in zip(paths, args.members)]
    singles = [errors_of(y, [p]) for p in probabilities]
    print(json.dumps({"members": dict(zip(args.members, singles)),
                      "mean_errors": statistics.mean(singles)}))
    for k in args.k:
        print(json.dumps(subsets(y, probabilities, k)))
        if args.sets:
            for start in range(0, len(probabilities) - k + 1, k):
                group = list(range(start, start + k))
                print(json.dumps({"k": k, "set": [args.members[i] for i in group],
                                  "errors": errors_of(y, [probabilities[i] for i in group])}))


if __name__ == "__main__":
    main()
