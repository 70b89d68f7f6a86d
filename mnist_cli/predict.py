"""Classify your own images of handwritten digits with the pipeline's trained model.

    mnist-predict IMAGE...                  # the workspace's model, data/model
    mnist-predict --rev v1.0 IMAGE...       # the model of a commit, tag or experiment
    mnist-predict --model-dir DIR IMAGE...  # any model folder (e.g. from `dvc artifacts get`)

Each image (PNG, JPEG, BMP, GIF, ... of any size) goes through MNIST's own preprocessing
(mnist_cli/preprocess.py) and the model of whichever framework trained it; one line per image:
the digit, its probability and the runner-up. `--json` prints the same for scripts, `--show`
draws the 28×28 the model saw. A file that cannot be classified gets one `error:` line on
stderr, the others are still classified, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from mnist_cli import revisions
from mnist_cli.command import command
from mnist_cli.preprocess import ImageError, load_digit
from stages import frameworks
from stages.data.console import draw
from stages.runtime.failures import DataError

MODEL_DIR = "data/model"
DIGITS = [str(d) for d in range(10)]
BATCH = 256


def ranked(probabilities: np.ndarray, names: list[str]) -> dict:
    """The prediction, its runner-up and every class's probability, for one image."""
    order = np.argsort(-probabilities, kind="stable")
    first, second = int(order[0]), int(order[1])
    return {"prediction": names[first], "probability": round(float(probabilities[first]), 6),
            "runner_up": names[second],
            "runner_up_probability": round(float(probabilities[second]), 6),
            "probabilities": {names[c]: round(float(p), 6) for c, p in enumerate(probabilities)}}


def line(file: str, result: dict) -> str:
    return (f"{file}: {result['prediction']} ({100 * result['probability']:.1f}%), "
            f"runner-up {result['runner_up']} ({100 * result['runner_up_probability']:.1f}%)")


def load_model(model_dir: Path):
    """The model in model_dir, whichever framework made it (its run_info.json says), as a
    function from N×28×28 digits to N×10 probabilities."""
    # One thread: a few images need no more, and the prediction does not depend on it.
    model = frameworks.predictor(model_dir, 1, 1)
    return lambda digits: model(digits, BATCH)


def classify(files: list[str], model, names: list[str]):
    """(file, result or None, digit or None, error or None) per file, in order, BATCH files
    at a time: memory stays bounded however many files there are."""
    for start in range(0, len(files), BATCH):
        digits, failures = {}, {}
        for file in files[start:start + BATCH]:
            try:
                digits[file] = load_digit(file)
            except ImageError as err:
                failures[file] = str(err)
        probabilities = dict(zip(digits, model(np.stack(list(digits.values()))))) \
            if digits else {}
        for file in files[start:start + BATCH]:
            yield (file, ranked(probabilities[file], names) if file in probabilities else None,
                   digits.get(file), failures.get(file))


def names_for(rev: str | None) -> list[str]:
    """The class names of the revision's params.yaml; the digits outside a project."""
    if rev is None and not Path("params.yaml").exists():
        return DIGITS
    return revisions.classes(rev)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mnist-predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, GIF, ...)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-dir", type=Path, help=f"a model folder (default {MODEL_DIR})")
    source.add_argument("--rev", help="use the model of this commit, tag, branch or experiment "
                                      "(read through DVC: the cache or the remote)")
    parser.add_argument("--json", action="store_true", help="print a JSON list for scripts")
    parser.add_argument("--show", action="store_true",
                        help="draw the 28×28 image the model saw under each line")
    args = parser.parse_args(argv)

    names = names_for(args.rev)
    with tempfile.TemporaryDirectory(prefix="mnist-predict-") as scratch:
        if args.rev:
            model_dir = revisions.fetch(MODEL_DIR, args.rev, Path(scratch) / "model")
        else:
            model_dir = args.model_dir or Path(MODEL_DIR)
            if not model_dir.is_dir():
                raise DataError(f"{model_dir}: no model folder (run `make repro`, "
                                "`dvc pull train`, or pass --model-dir / --rev)")
        model = load_model(model_dir)

    failed, listed = False, []
    for file, result, digit, error in classify(args.images, model, names):  # in order
        failed = failed or bool(error)
        if error:
            print(f"error: {error}", file=sys.stderr, flush=True)
        if args.json:
            listed.append({"file": file, **(result or {"error": error})})
        elif result:
            print(line(file, result))
            if args.show:
                print(draw(digit * 255))
            sys.stdout.flush()
    if args.json:
        print(json.dumps(listed, indent=2))
    return 1 if failed else 0


def entry_point() -> None:
    """The `mnist-predict` console script."""
    command(main)


if __name__ == "__main__":
    entry_point()
