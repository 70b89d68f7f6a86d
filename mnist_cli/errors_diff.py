"""Which test images did a change fix, which did it break, which are still wrong?

    mnist-errors-diff                 # HEAD against the workspace
    mnist-errors-diff main exp-1a2b3  # any two commits, tags, branches or experiments

`dvc metrics diff` says 34 -> 31 errors; this names them, each with the verdict of the side
that got it wrong (label-error, ambiguous, model-error: stages/analysis/verdicts.py), so a
"fixed" image on which the new model only agrees with a suspected wrong label shows as such.
Each side's predictions (data/predictions.npz) and verdicts (reports/misclassified.csv) are
read through DVC from the cache or the remote, never retrained; the test images from the
newer side's raw data. Both sides must have evaluated the same test
set (their dvc.lock files say so). Prints a table; writes a self-contained page in the style of
reports/errors.html (--page, default reports/errors_diff.html); --json for scripts.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from mnist_cli import revisions
from mnist_cli.command import command
from stages.analysis import verdicts
from stages.analysis.page import CSP, STYLE, badge, img, table, td
from stages.runtime.failures import DataError
from stages.runtime.outputs import write_text

PAGE = "reports/errors_diff.html"
GROUPS = (("fixed", "Fixed", "wrong before, right now"),
          ("newly_wrong", "Newly wrong", "right before, wrong now"),
          ("still_wrong", "Still wrong", "wrong on both sides"))


def compare(y: np.ndarray, old: np.ndarray, new: np.ndarray) -> dict[str, list[dict]]:
    """Every test image misclassified on either side, by group (fixed, newly_wrong, still_wrong).

    y: true labels (N); old, new: N×10 probabilities. A record holds the image's index,
    true label, each side's prediction, its probability, and each side's p(true). Each group
    is sorted by how confidently the side that got it wrong was wrong (most first)."""
    old_pred, new_pred = old.argmax(axis=1), new.argmax(axis=1)
    old_wrong, new_wrong = old_pred != y, new_pred != y
    rows = np.arange(len(y))

    def records(mask: np.ndarray, by: np.ndarray) -> list[dict]:
        picked = np.flatnonzero(mask)
        order = picked[np.lexsort((picked, -by[picked]))]
        return [{"index": int(i), "true": int(y[i]),
                 "old": int(old_pred[i]), "old_confidence": float(old[i, old_pred[i]]),
                 "old_p_true": float(old[i, y[i]]),
                 "new": int(new_pred[i]), "new_confidence": float(new[i, new_pred[i]]),
                 "new_p_true": float(new[i, y[i]])} for i in order]

    old_conf, new_conf = old[rows, old_pred], new[rows, new_pred]
    return {"fixed": records(old_wrong & ~new_wrong, old_conf),
            "newly_wrong": records(~old_wrong & new_wrong, new_conf),
            "still_wrong": records(old_wrong & new_wrong, new_conf)}


def attach_verdicts(groups: dict, old: dict[int, str], new: dict[int, str]) -> None:
    """Each record's old_verdict and new_verdict (None where that side got the image right,
    or has no verdicts), and its verdict: that of the side that got it wrong (the new side
    when both did)."""
    for key, records in groups.items():
        for r in records:
            r["old_verdict"] = old.get(r["index"]) if key != "newly_wrong" else None
            r["new_verdict"] = new.get(r["index"]) if key != "fixed" else None
            r["verdict"] = r["old_verdict"] if key == "fixed" else r["new_verdict"]


def agrees_with_suspect_label(groups: dict) -> list[dict]:
    """The fixed images the old side's verdict called label errors: the new model now
    agrees with a label the evidence says is probably wrong."""
    return [r for r in groups["fixed"] if r.get("verdict") == verdicts.LABEL_ERROR]


def summary(groups: dict, old_label: str, new_label: str, samples: int) -> str:
    old_errors = len(groups["fixed"]) + len(groups["still_wrong"])
    new_errors = len(groups["newly_wrong"]) + len(groups["still_wrong"])
    moved = sum(r["old"] != r["new"] for r in groups["still_wrong"])
    suspect = len(agrees_with_suspect_label(groups))
    return (f"{old_label}: {old_errors} errors, {new_label}: {new_errors} errors "
            f"(of {samples} test images)\n"
            f"fixed {len(groups['fixed'])} ({suspect} of them only agree with a suspected wrong "
            "label), "
            f"newly wrong {len(groups['newly_wrong'])}, "
            f"still wrong {len(groups['still_wrong'])} ({moved} of them now predicted as another "
            "wrong class)")


def text_table(groups: dict, names: list[str], old_label: str, new_label: str) -> str:
    """One row per image, grouped: index, true class, each side's prediction (probability)."""
    header = ["", "index", "true", old_label, new_label, "verdict"]
    rows = [[title.lower(), str(r["index"]), names[r["true"]],
             f"{names[r['old']]} ({r['old_confidence']:.3f})",
             f"{names[r['new']]} ({r['new_confidence']:.3f})", r.get("verdict") or "-"]
            for key, title, _ in GROUPS for r in groups[key]]
    if not rows:
        return "no test image is misclassified on either side"
    widths = [max(len(row[c]) for row in [header] + rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c in (0, 2, 5) else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in [header] + rows)


def page(groups: dict, x_test: np.ndarray, names: list[str], old_label: str,
         new_label: str) -> str:
    """The comparison as one static page: images inline, no script, nothing loaded."""
    esc = [html.escape(name) for name in names]
    old_h, new_h = html.escape(old_label), html.escape(new_label)
    samples = len(x_test)
    out = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>MNIST: errors of {old_h} and {new_h}</title>\n",
        f"<style>{STYLE}</style>\n</head>\n<body>\n",
        f"<h1>Misclassified test images: {old_h} &rarr; {new_h}</h1>\n",
        "<p>" + html.escape(summary(groups, old_label, new_label, samples)).replace(
            "\n", "<br>") + ". Confidence is a side's probability for the class it "
        "predicted; p(true) its probability for the true class.</p>\n",
        "<nav>" + " ".join(f'<a href="#{key}">{title.lower()} ({len(groups[key])})</a>'
                           for key, title, _ in GROUPS) + "</nav>\n",
    ]
    for key, title, meaning in GROUPS:
        out.append(f'<section id="{key}">\n<h2>{title}: {len(groups[key])} ({meaning})</h2>\n')
        if not groups[key]:
            out.append("<p>None.</p>\n</section>\n")
            continue
        suspect = agrees_with_suspect_label(groups) if key == "fixed" else []
        if suspect:
            out.append(f"<p>{len(suspect)} of these {old_h} called "
                       f"{badge(verdicts.LABEL_ERROR)}: {new_h} now agrees with a label the "
                       "evidence says is probably wrong, which is no progress.</p>\n")
        rows = [[td(img(x_test[r["index"]], f"test image {r['index']}")),
                 td(r["index"]), td(esc[r["true"]]),
                 td(f"{esc[r['old']]} ({r['old_confidence']:.3f})"),
                 td(f"{r['old_p_true']:.3f}"),
                 td(f"{esc[r['new']]} ({r['new_confidence']:.3f})"),
                 td(f"{r['new_p_true']:.3f}"), td(badge(r.get("verdict") or ""), "l")]
                for r in groups[key]]
        out.append(table(["image", "test index", "true", f"{old_h}: predicted (confidence)",
                          f"{old_h}: p(true)", f"{new_h}: predicted (confidence)",
                          f"{new_h}: p(true)", "verdict"], rows))
        out.append("</section>\n")
    out.append("</body>\n</html>\n")
    return "".join(out)


def evaluated_data(rev: str | None) -> tuple[dict, str]:
    """The revision's dvc.yaml paths, and the hash of the test data its evaluate stage read."""
    where = revisions.label(rev)
    spec = revisions.read_yaml("dvc.yaml", rev)
    paths = {k: v for entry in spec.get("vars") or [] for k, v in entry.items()}
    lock = revisions.read_yaml("dvc.lock", rev)
    stage = (lock.get("stages") or {}).get("evaluate")
    if not stage:
        raise DataError(f"{where}: dvc.lock has no evaluate stage: nothing was evaluated "
                        "there (`dvc repro` first)")
    data = [dep.get("md5") for dep in stage.get("deps", []) if dep.get("path") == paths.get(
        "processed")]
    if not data or not paths.get("predictions") or not paths.get("raw"):
        raise DataError(f"{where}: dvc.yaml and dvc.lock do not name the evaluated data")
    return paths, data[0]


def predictions(paths: dict, rev: str | None, scratch: Path, samples: int) -> np.ndarray:
    """The revision's test probabilities (evaluate's output), checked: samples×10, finite."""
    p = revisions.read_npz(paths["predictions"], rev, ("probabilities",), scratch)[
        "probabilities"]
    if p.ndim != 2 or p.shape != (samples, 10) or not np.isfinite(p).all():
        raise DataError(f"{paths['predictions']} at {revisions.label(rev)}: expected "
                        f"{samples}×10 finite probabilities, got shape {p.shape}")
    return p


def judged(paths: dict, rev: str | None, names: list[str]) -> dict[int, str]:
    """test index -> verdict, from the revision's reports/misclassified.csv; empty for a
    revision from before the verdicts (its table has no verdict column)."""
    if not paths.get("misclassified"):
        return {}
    where = f"{paths['misclassified']} at {revisions.label(rev)}"
    try:
        reader = csv.DictReader(io.StringIO(
            revisions.read_bytes(paths["misclassified"], rev).decode("utf-8")))
        if "verdict" not in (reader.fieldnames or []):
            return {}
        records = verdicts.read_misclassified(list(reader), names)
    except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{where}: unreadable table ({err})") from None
    return {i: r["verdict"] for i, r in records.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mnist-errors-diff",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("old", nargs="?", default="HEAD", help="a revision (default HEAD)")
    parser.add_argument("new", nargs="?", default=None,
                        help="a revision (default: the workspace)")
    parser.add_argument("--page", default=PAGE, help=f"the page to write (default {PAGE})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    old_label, new_label = revisions.label(args.old), revisions.label(args.new)

    new_paths, new_data = evaluated_data(args.new)
    old_paths, old_data = evaluated_data(args.old)
    if old_data != new_data:
        raise DataError(f"{old_label} and {new_label} evaluated different test data "
                        f"({old_data} vs {new_data}): their errors cannot be compared")
    with tempfile.TemporaryDirectory(prefix="mnist-errors-diff-") as scratch:
        raw = revisions.read_npz(new_paths["raw"], args.new,
                                 ("x_train", "y_train", "x_test", "y_test"), Path(scratch),
                                 only=("x_test", "y_test"))
        y = raw["y_test"].astype(np.int64)
        old = predictions(old_paths, args.old, Path(scratch), len(y))
        new = predictions(new_paths, args.new, Path(scratch), len(y))
    names = revisions.classes(args.new)
    groups = compare(y, old, new)
    attach_verdicts(groups, judged(old_paths, args.old, revisions.classes(args.old)),
                    judged(new_paths, args.new, names))

    write_text(args.page, page(groups, raw["x_test"], names, old_label, new_label))
    if args.json:
        print(json.dumps({"old": old_label, "new": new_label, "samples": len(y), **groups},
                         indent=2))
    else:
        print(summary(groups, old_label, new_label, len(y)))
        print()
        print(text_table(groups, names, old_label, new_label))
        print(f"\npage -> {args.page}")


def entry_point() -> None:
    """The `mnist-errors-diff` console script."""
    command(main)


if __name__ == "__main__":
    entry_point()
