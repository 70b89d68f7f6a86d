"""A committee of experiments: the mean of their test probabilities, scored like one model.

    dvc exp run --queue -S train.seed=1    # ... one per member; `dvc queue start`
    mnist-committee exp-a exp-b exp-c      # any experiments, commits, tags or branches

Each member's test probabilities (evaluate's data/predictions.npz) are read through DVC from
the cache or the remote, as mnist-errors-diff reads them: nothing retrains. Members must have
evaluated the same test set (their dvc.lock files say so). The committee predicts the class
of the highest mean probability. It gets the pipeline's headline metrics and every error its
verdict (stages/analysis/verdicts.py), and is compared with one member (`--against`, default
the first) image by image. Into --out (default reports/committee/): metrics.json,
predictions.npz, misclassified.csv and errors_diff.html (the committee against that member).

The verdicts read the committee's probabilities calibrated by one temperature, the
geometric mean of the members' own (each fitted by evaluate on that member's validation
split, in its metrics.json): each seed holds out its own split, so no image is held out
from every member to fit the committee's on. One temperature keeps every prediction.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from mnist_cli import errors_diff, revisions
from mnist_cli.command import command
from stages.analysis import scoring, verdicts
from stages.data.mnist import scale
from stages.runtime import params
from stages.runtime.failures import DataError
from stages.runtime.outputs import round_floats, save_npz, write_csv, write_json, write_text

OUT = "reports/committee"
MAX_MEMBERS = 100  # each member's probabilities take 400 kB in memory for MNIST's test set
COMMITTEE = "committee"


def combine(members: list[np.ndarray]) -> np.ndarray:
    """The members' mean probability per image and class (summed in float64, in the
    members' order), as float32 like evaluate's."""
    return np.mean(np.stack(members).astype(np.float64), axis=0).astype(np.float32)


def member_row(rev: str, y: np.ndarray, probabilities: np.ndarray) -> dict:
    return {"revision": rev, **scoring.headline(y, probabilities)}


def report(members: list[dict], committee: dict) -> dict:
    """The committee's metrics.json: its headline and verdict counts, the members' own
    headlines, and their mean errors (what one member gets, on average)."""
    mean_errors = float(np.mean([m["errors"] for m in members]))
    return round_floats(committee | {
        "members": members, "member_mean_errors": mean_errors,
        "errors_vs_member_mean": committee["errors"] - mean_errors})


def text_table(result: dict) -> str:
    rows = [(m["revision"], m["errors"], m["accuracy"], m["loss"]) for m in result["members"]]
    rows.append((f"{COMMITTEE} of {len(rows)}", result["errors"], result["accuracy"],
                 result["loss"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  errors  accuracy  test loss"]
    lines += [f"{name:{width}}  {errors:6d}  {accuracy:8.2%}  {loss:9.4f}"
              for name, errors, accuracy, loss in rows]
    lines.append(f"members' mean: {result['member_mean_errors']:.1f} errors; the committee's "
                 f"verdicts: {result['label_errors']} label errors, {result['ambiguous']} "
                 f"ambiguous, {result['model_errors']} model errors")
    return "\n".join(lines)


def evaluated_together(revs: list[str]) -> list[dict]:
    """Each member's dvc.yaml paths; one line unless every member evaluated the same data."""
    seen = {rev: errors_diff.evaluated_data(rev) for rev in revs}
    data = {rev: digest for rev, (_, digest) in seen.items()}
    first = revs[0]
    for rev in revs[1:]:
        if data[rev] != data[first]:
            raise DataError(f"{first} and {rev} evaluated different test data "
                            f"({data[first]} vs {data[rev]}): they cannot form a committee")
    return [seen[rev][0] for rev in revs]


def temperature(paths: dict, rev: str) -> float:
    """The calibration temperature evaluate fitted for the revision's model (1.0 for one
    from before the verdicts: its metrics.json has none)."""
    where = f"{paths['metrics']} at {rev}"
    try:
        value = json.loads(revisions.read_bytes(paths["metrics"], rev)).get("temperature", 1.0)
    except (UnicodeDecodeError, ValueError, AttributeError) as err:
        raise DataError(f"{where}: unreadable metrics ({err})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
        raise DataError(f"{where}: temperature must be a positive number, got {value!r}")
    return float(value)


def verdicts_neighbours(rev: str) -> int:
    """evaluate.neighbours (K) as the revision's params.yaml has it: the committee's
    verdicts use the members' K."""
    return params.evaluate(revisions.read_yaml("params.yaml", rev).get("evaluate") or {})[
        "neighbours"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mnist-committee",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("members", nargs="+", metavar="REV",
                        help="two or more experiments, commits, tags or branches")
    parser.add_argument("--against", metavar="REV",
                        help="the member the errors diff compares with (default: the first)")
    parser.add_argument("--out", default=OUT, help=f"the folder to write (default {OUT})")
    parser.add_argument("--json", action="store_true", help="print metrics.json instead")
    args = parser.parse_args(argv)
    revs = list(dict.fromkeys(args.members))
    if len(revs) < 2 or len(revs) > MAX_MEMBERS:
        raise DataError(f"a committee needs 2 to {MAX_MEMBERS} different members, got "
                        f"{len(revs)}")
    against = args.against or revs[0]
    if against not in revs:
        raise DataError(f"--against {against}: not a member ({', '.join(revs)})")

    paths = evaluated_together(revs)
    with tempfile.TemporaryDirectory(prefix="mnist-committee-") as scratch:
        raw = revisions.read_npz(paths[0]["raw"], revs[0],
                                 ("x_train", "y_train", "x_test", "y_test"), Path(scratch))
        y = raw["y_test"].astype(np.int64)
        probabilities = [errors_diff.predictions(p, rev, Path(scratch), len(y))
                         for p, rev in zip(paths, revs)]
    names = revisions.classes(revs[0])
    combined = combine(probabilities)

    t = float(np.exp(np.mean([np.log(temperature(p, rev)) for p, rev in zip(paths, revs)])))
    data = {key: scale(raw[key]) if key.startswith("x_") else raw[key] for key in raw}
    records = verdicts.judge_calibrated(data, combined, verdicts.calibrate(combined, t),
                               verdicts_neighbours(revs[0]))
    result = report([member_row(rev, y, p) for rev, p in zip(revs, probabilities)],
                    scoring.headline(y, combined) | verdicts.counts(records)
                    | {"temperature": t})

    out = Path(args.out)
    member = probabilities[revs.index(against)]
    groups = errors_diff.compare(y, member, combined)
    errors_diff.attach_verdicts(groups, errors_diff.judged(paths[revs.index(against)],
                                                           against, names),
                                {r["index"]: r["verdict"] for r in records})
    save_npz(out / "predictions.npz", probabilities=combined)
    write_csv(out / "misclassified.csv", verdicts.MISCLASSIFIED_HEADER,
              verdicts.misclassified_rows(verdicts.misclassified(y, combined), records, names))
    write_text(out / "errors_diff.html",
               errors_diff.page(groups, raw["x_test"], names, against, COMMITTEE))
    write_json(out / "metrics.json", result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(text_table(result))
        print()
        print(errors_diff.summary(groups, against, COMMITTEE, len(y)))
        print(f"\n-> {out}/ (metrics.json, predictions.npz, misclassified.csv, "
              "errors_diff.html)")


def entry_point() -> None:
    """The `mnist-committee` console script."""
    command(main)


if __name__ == "__main__":
    entry_point()
