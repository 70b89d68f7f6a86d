"""Whose mistake is each error: the label's, the model's, or nobody's for sure.

A misclassified image (given label y, the model's prediction p) gets one of three verdicts,
from two readers that share nothing but the training labels:

- the model, calibrated: its probabilities are rescaled by one temperature T fitted on the
  validation split (Guo et al. 2017, temperature scaling: p_T ∝ p^(1/T), T minimising the
  cross-entropy of the held-out images), then confident learning (cleanlab's
  `find_label_issues`, Northcutt et al. 2021) asks whether the image sits confidently in
  another class than its label: its default method (prune by noise rate) counts, with
  per-class confidence thresholds, how many labels of each class are likely another's, and
  flags that many, least self-confident first, all learnt from the images it is given.
  Calibration comes first because label smoothing caps a model's confidence: uncalibrated,
  confident learning finds too few images (benchmarks/RESULTS.md);
- its K nearest training images in pixel space (stages/analysis/neighbours.py), each
  voting with its label: a reader with no model at all, which knows only what the training
  images of each class look like.

    label-error  confident learning flags the image, its calibrated p(p) is above 1/2,
                 AND most (more than half) of its K neighbours are labelled p: both
                 readers see p; the given label is probably wrong;
    model-error  most of its K neighbours carry the given label y: the image looks like the
                 training images of its label, so the label is clear and right, and the
                 model failed;
    ambiguous    anything else: the neighbours are split or mostly name a third class, or
                 they side with p while the calibrated model is not confident of it. A
                 person could read it either way, or as neither.

Majority and confident learning's thresholds are fixed by principle or fitted on the data's
own held-out images; no list of known label errors is used, so the verdicts work unchanged
on any data in MNIST's layout. Where they can be wrong: docs/outputs.md.
"""

from __future__ import annotations

import numpy as np

from stages.analysis.neighbours import nearest
from stages.data.mnist import raw_pixels

LABEL_ERROR, AMBIGUOUS, MODEL_ERROR = "label-error", "ambiguous", "model-error"
VERDICTS = (LABEL_ERROR, AMBIGUOUS, MODEL_ERROR)
METRICS = {LABEL_ERROR: "label_errors", AMBIGUOUS: "ambiguous", MODEL_ERROR: "model_errors"}
# Probabilities are clipped below at the smallest normal float32: log(0) has no temperature.
_TINY = float(np.finfo(np.float32).tiny)


def _log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probabilities, dtype=np.float64), _TINY))


def calibrate(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax(log p / T), row by row, in float64: T < 1 sharpens, T > 1 softens, T = 1 is
    the identity (up to rounding). The argmax of a row never changes."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _log(probabilities) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probabilities: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean cross-entropy of the labels under the probabilities calibrated at T."""
    z = _log(probabilities) / temperature
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray,
                    lo: float = 0.01, hi: float = 100.0, steps: int = 100) -> float:
    """The T in [lo, hi] that minimises nll on held-out (probabilities, labels).

    Golden-section search on log T (the cross-entropy is convex in 1/T), a fixed number of
    steps: deterministic, and T is found to about 1e-8 of log(hi / lo)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no held-out images to fit a temperature on")
    a, b = np.log(lo), np.log(hi)
    ratio = (np.sqrt(5.0) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(probabilities, labels, np.exp(c)), nll(probabilities, labels, np.exp(d))
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(probabilities, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(probabilities, labels, np.exp(d))
    return float(np.exp((a + b) / 2))


def confident_learning(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """cleanlab's label issues (boolean per image): the images that confidently belong to
    another class than their label, by its default method (prune by noise rate)."""
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, dtype=np.int64)
    return np.asarray(find_label_issues(labels, probabilities, n_jobs=1), dtype=bool)


def votes(neighbour_labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """How many of each row's neighbours carry the class asked for in that row."""
    neighbour_labels = np.asarray(neighbour_labels)
    return (neighbour_labels == np.asarray(classes)[:, None]).sum(axis=1)


def reads_predicted(flagged: bool, p_predicted: float) -> bool:
    """The model reader's half: confident learning flags the label, and the calibrated
    model finds its prediction more likely than not (a weak model's per-class thresholds
    can be low enough to flag an image it gives 0.3)."""
    return bool(flagged) and p_predicted > 0.5


def verdict(model_reads_predicted: bool, votes_predicted: int, votes_label: int,
            k: int) -> str:
    """The rule of the module's docstring, for one image."""
    if 2 * votes_label > k:
        return MODEL_ERROR
    if model_reads_predicted and 2 * votes_predicted > k:
        return LABEL_ERROR
    return AMBIGUOUS


def judge(labels: np.ndarray, calibrated: np.ndarray, flagged: np.ndarray,
          neighbour_labels: np.ndarray, indices: np.ndarray) -> list[dict]:
    """One record per image in `indices` (the misclassified ones): its label, prediction,
    calibrated probabilities of both, whether confident learning flagged it, the labels of
    its K nearest training images (nearest first, a row of neighbour_labels per index),
    the votes for prediction and label, and the verdict."""
    labels = np.asarray(labels, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    predicted = calibrated[indices].argmax(axis=1)
    given = labels[indices]
    k = np.asarray(neighbour_labels).shape[1]
    for_predicted, for_label = votes(neighbour_labels, predicted), votes(neighbour_labels, given)
    return [{"index": int(i), "true": int(t), "predicted": int(p),
             "p_predicted": float(calibrated[i, p]), "p_true": float(calibrated[i, t]),
             "flagged": bool(flagged[i]), "neighbour_labels": [int(c) for c in row],
             "votes_predicted": int(vp), "votes_true": int(vt),
             "verdict": verdict(reads_predicted(flagged[i], calibrated[i, p]), int(vp),
                                int(vt), k)}
            for i, t, p, row, vp, vt in zip(indices, given, predicted,
                                            np.asarray(neighbour_labels).tolist(),
                                            for_predicted, for_label)]


def judge_errors(data: dict[str, np.ndarray], probabilities: np.ndarray,
                 val_probabilities: np.ndarray | None, val_labels: np.ndarray | None,
                 k: int) -> tuple[list[dict], float]:
    """Every misclassified test image's verdict record (by index; judge(), plus its
    neighbours' training indices), and the temperature that calibrated the model (1.0 when
    there is no validation split: then nothing is held out to fit it on)."""
    temperature = 1.0
    if val_probabilities is not None and len(val_labels):
        temperature = fit_temperature(val_probabilities, val_labels)
    calibrated = calibrate(probabilities, temperature)
    return judge_calibrated(data, probabilities, calibrated, k), temperature


def judge_calibrated(data: dict[str, np.ndarray], probabilities: np.ndarray,
                     calibrated: np.ndarray, k: int) -> list[dict]:
    """judge_errors' records, given the calibrated probabilities: the errors are
    `probabilities`' (argmax), their evidence the calibrated ones' and the neighbours'."""
    y = data["y_test"].astype(np.int64)
    flagged = confident_learning(y, calibrated)
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != y)
    found, _ = nearest(raw_pixels(data["x_test"][wrong]), raw_pixels(data["x_train"]), k)
    labels = data["y_train"].astype(np.int64)[found]
    records = judge(y, calibrated, flagged, labels, wrong)
    for record, row in zip(records, found.tolist(), strict=True):
        record["neighbours"] = row
    return records


def counts(records: list[dict]) -> dict[str, int]:
    """Errors per verdict, every verdict present (metrics.json's keys)."""
    return {key: sum(r["verdict"] == v for r in records) for v, key in METRICS.items()}


def evidence(record: dict, names: list[str]) -> str:
    """The verdict's reasons in words, e.g. "8 of its 9 nearest training images are
    labelled 9, 1 is labelled 8; calibrated p(9) = 0.97, p(8) = 0.01; confident learning
    flags its label"."""
    t, p = names[record["true"]], names[record["predicted"]]
    k = len(record["neighbour_labels"])
    vp, vt = record["votes_predicted"], record["votes_true"]
    words = (f"{vp} of its {k} nearest training images {'is' if vp == 1 else 'are'} "
             f"labelled {p}, {vt} {'is' if vt == 1 else 'are'} labelled {t}")
    if k - vp - vt:
        words += f", {k - vp - vt} {'is' if k - vp - vt == 1 else 'are'} labelled otherwise"
    cl = "flags its label" if record["flagged"] else "does not flag its label"
    return (f"{words}; calibrated p({p}) = {record['p_predicted']:.2f}, "
            f"p({t}) = {record['p_true']:.2f}; confident learning {cl}")


# reports/misclassified.csv: evaluate writes it, render-errors and mnist-errors-diff read it.
MISCLASSIFIED_HEADER = ["index", "true", "predicted", "confidence", "verdict", "p_predicted",
                        "p_true", "confident_learning", "votes_predicted", "votes_true",
                        "neighbours", "neighbour_labels"]


def misclassified(y_true: np.ndarray, probabilities: np.ndarray) -> list[tuple]:
    """(test index, true label, predicted label, confidence in the prediction), by index."""
    y_pred = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    return [(int(i), int(y_true[i]), int(y_pred[i]), f"{probabilities[i, y_pred[i]]:.6f}")
            for i in wrong]


def misclassified_rows(rows: list[tuple], records: list[dict], names: list[str]):
    """The CSV's rows: (index, true, predicted, confidence) tuples and the verdict records of
    the same images, both by index; lists space-separated, nearest neighbour first."""
    for (i, t, p, conf), r in zip(rows, records, strict=True):
        if (i, t, p) != (r["index"], r["true"], r["predicted"]):
            raise ValueError(f"row {i} and its verdict record differ")
        yield (i, names[t], names[p], conf, r["verdict"], f"{r['p_predicted']:.6f}",
               f"{r['p_true']:.6f}", "yes" if r["flagged"] else "no", r["votes_predicted"],
               r["votes_true"], " ".join(map(str, r["neighbours"])),
               " ".join(map(str, r["neighbour_labels"])))


def read_misclassified(rows: list[dict[str, str]], names: list[str]) -> dict[int, dict]:
    """The CSV's rows (csv.DictReader's strings) back to verdict records, by test index.
    Raises ValueError or KeyError on a row that does not parse."""
    label = {name: c for c, name in enumerate(names)}
    out = {}
    for r in rows:
        if r["verdict"] not in VERDICTS or r["confident_learning"] not in ("yes", "no"):
            raise ValueError(f"index {r['index']}: verdict {r['verdict']!r} / "
                             f"confident_learning {r['confident_learning']!r}")
        index = int(r["index"])
        out[index] = {"index": index, "true": label[r["true"]], "predicted": label[r["predicted"]],
                      "verdict": r["verdict"], "p_predicted": float(r["p_predicted"]),
                      "p_true": float(r["p_true"]), "flagged": r["confident_learning"] == "yes",
                      "votes_predicted": int(r["votes_predicted"]),
                      "votes_true": int(r["votes_true"]),
                      "neighbours": [int(v) for v in r["neighbours"].split()],
                      "neighbour_labels": [int(v) for v in r["neighbour_labels"].split()]}
    return out
