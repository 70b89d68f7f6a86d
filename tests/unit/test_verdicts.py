"""stages/analysis/verdicts.py: temperature scaling (calibrate, nll, fit_temperature), the
confident-learning flag, the neighbours' votes and the verdict rule, the records judge builds
from them, their evidence in words, the misclassified images' rows and the CSV's round
trip."""

from __future__ import annotations

import csv
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from stages.analysis import verdicts as v
from stages.runtime.outputs import write_csv

# Fashion-MNIST-like names: spaces, a slash, a comma and a quote, which the CSV must survive.
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat, long", "Sandal", "Shirt",
         'Sneaker "low"', "Bag, small", "Ankle boot"]


def random_probabilities(rng, n, c=10, scale=2.0):
    return softmax(rng.normal(0.0, scale, (n, c)), axis=1)


def sample_labels(rng, probabilities):
    """One label per row, drawn from that row's distribution (inverse CDF)."""
    cdf = probabilities.cumsum(axis=1)
    u = rng.random(len(probabilities))[:, None] * cdf[:, -1:]
    return (u > cdf).sum(axis=1)


# --- calibrate --------------------------------------------------------------------------


def test_temperature_one_returns_the_normalised_input():
    rng = np.random.default_rng(0)
    p = random_probabilities(rng, 50)
    np.testing.assert_allclose(v.calibrate(p, 1.0), p, atol=1e-6, rtol=0)
    # Rows that do not sum to 1 come back normalised.
    raw = rng.uniform(0.01, 5.0, (20, 7))
    np.testing.assert_allclose(v.calibrate(raw, 1.0), raw / raw.sum(axis=1, keepdims=True),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [0.01, 0.3, 1.0, 2.5, 100.0])
def test_calibrated_rows_sum_to_one_and_keep_their_argmax(temperature):
    rng = np.random.default_rng(1)
    p = random_probabilities(rng, 200, scale=3.0).astype(np.float32)
    got = v.calibrate(p, temperature)
    assert got.shape == p.shape and np.isfinite(got).all() and (got >= 0).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12, rtol=0)
    np.testing.assert_array_equal(got.argmax(axis=1), p.argmax(axis=1))


def test_calibrate_is_a_power_of_the_probabilities():
    """p_T ∝ p^(1/T): the defining formula, computed independently."""
    rng = np.random.default_rng(2)
    p = random_probabilities(rng, 30, scale=1.0)
    for t in (0.5, 1.7, 4.0):
        want = p ** (1 / t)
        np.testing.assert_allclose(v.calibrate(p, t), want / want.sum(axis=1, keepdims=True),
                                   rtol=1e-10, atol=1e-14)
    # Two temperatures in a row are one temperature, their product.
    np.testing.assert_allclose(v.calibrate(v.calibrate(p, 0.5), 3.0), v.calibrate(p, 1.5),
                               rtol=1e-9, atol=1e-14)


def test_low_temperature_sharpens_and_high_temperature_softens():
    rng = np.random.default_rng(3)
    p = random_probabilities(rng, 100, scale=1.0)  # no row one-hot, no row uniform
    top = p.max(axis=1)
    assert (v.calibrate(p, 0.5).max(axis=1) > top).all()
    assert (v.calibrate(p, 2.0).max(axis=1) < top).all()
    # Monotone in T, and towards uniform as T grows.
    tops = [v.calibrate(p, t).max(axis=1) for t in (0.01, 0.1, 0.5, 1, 2, 10, 1000)]
    assert all((a >= b).all() for a, b in zip(tops, tops[1:]))
    np.testing.assert_allclose(tops[-1], 1 / p.shape[1], atol=1e-2)


@pytest.mark.parametrize("temperature", [0.01, 1.0, 100.0])
def test_zero_probabilities_from_float32_underflow_give_no_nan(temperature):
    p = np.zeros((4, 10), dtype=np.float32)
    p[0, 3] = 1.0                                 # one-hot: every other class underflowed
    p[1, :2] = [0.75, 0.25]
    p[2, :] = 0.1
    p[2, 9] = 0.0
    p[3, 5] = np.float32(1.0)
    p[3, 6] = np.float32(1e-45)                   # a float32 denormal
    got = v.calibrate(p, temperature)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(got.argmax(axis=1), [3, 0, 0, 5])
    if temperature <= 1:  # sharpening or identity keeps a zero at (about) zero
        assert got[p == 0].max() < 1e-6
    else:  # softening lifts it, but never above a class the model gave weight
        assert (got[0, 3] > got[0, :3]).all() and got[0, 3] > got[0, 4:].max()


# --- nll ----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.2, 1.0, 3.0])
def test_nll_is_the_mean_negative_log_of_the_calibrated_label_probability(temperature):
    rng = np.random.default_rng(4)
    p = random_probabilities(rng, 80)
    labels = rng.integers(0, 10, 80)
    calibrated = v.calibrate(p, temperature)
    want = float(np.mean([-math.log(calibrated[i, y]) for i, y in enumerate(labels)]))
    assert v.nll(p, labels, temperature) == pytest.approx(want, rel=1e-10)


# --- fit_temperature ----------------------------------------------------------------------


@pytest.mark.parametrize("t0", [0.5, 2.0, 3.0])
def test_fit_temperature_recovers_a_known_miscalibration(t0):
    """Labels drawn from softmax(z); the model reports softmax(t0 z). calibrate(p, T) =
    softmax(t0 z / T), the true distribution at T = t0, so the fit should land near t0."""
    rng = np.random.default_rng(5)
    z = rng.normal(0.0, 2.0, (5000, 10))
    labels = sample_labels(rng, softmax(z, axis=1))
    reported = softmax(z * t0, axis=1).astype(np.float32)
    fitted = v.fit_temperature(reported, labels)
    assert fitted == pytest.approx(t0, rel=0.06)
    # Scale equivariance, exact up to the search: the optimum on softmax(t0 z) is t0 times
    # the optimum on softmax(z) (calibrate only ever sees z / T).
    base = v.fit_temperature(softmax(z, axis=1), labels)
    exact = v.fit_temperature(softmax(z * t0, axis=1), labels)
    assert exact == pytest.approx(t0 * base, rel=1e-5)


def test_fit_temperature_matches_scipy_on_log_temperature():
    rng = np.random.default_rng(6)
    z = rng.normal(0.0, 1.5, (2000, 10))
    labels = sample_labels(rng, softmax(z, axis=1))
    p = softmax(1.8 * z, axis=1)
    lo, hi = 0.01, 100.0
    # An independent loss (scipy's log_softmax on log p / T), an independent minimiser.
    log_p = np.log(p)

    def loss(s):
        return -log_softmax(log_p / np.exp(s), axis=1)[np.arange(len(labels)), labels].mean()

    ref = minimize_scalar(loss, bounds=(math.log(lo), math.log(hi)), method="bounded",
                          options={"xatol": 1e-10})
    assert ref.success
    fitted = v.fit_temperature(p, labels, lo=lo, hi=hi)
    assert fitted == pytest.approx(math.exp(ref.x), rel=1e-4)
    assert v.nll(p, labels, fitted) <= loss(ref.x) + 1e-9
    # And it is a minimum: nudging T either way only raises the loss.
    for nudge in (0.98, 1.02):
        assert v.nll(p, labels, fitted * nudge) > v.nll(p, labels, fitted)


def test_fit_temperature_stays_inside_its_bounds():
    """When every label is the argmax, sharpening always lowers the loss: the optimum is the
    lower bound. When every label is the least likely class, it is the upper bound."""
    rng = np.random.default_rng(7)
    p = random_probabilities(rng, 100)
    best = v.fit_temperature(p, p.argmax(axis=1), lo=0.05, hi=20.0)
    assert best == pytest.approx(0.05, rel=1e-6)
    worst = v.fit_temperature(p, p.argmin(axis=1), lo=0.05, hi=20.0)
    assert worst == pytest.approx(20.0, rel=1e-6)


def test_fit_temperature_is_deterministic():
    rng = np.random.default_rng(8)
    p = random_probabilities(rng, 500)
    labels = sample_labels(rng, softmax(np.log(p) / 1.3, axis=1))
    assert v.fit_temperature(p, labels) == v.fit_temperature(p.copy(), labels.copy())


def test_fit_temperature_refuses_no_labels():
    with pytest.raises(ValueError, match="no held-out images"):
        v.fit_temperature(np.zeros((0, 10)), np.zeros(0, dtype=np.int64))


# --- confident_learning -----------------------------------------------------------------


def test_confident_learning_flags_flipped_labels_of_a_confident_model():
    rng = np.random.default_rng(9)
    n, c = 300, 10
    truth = np.arange(n) % c
    # A model that is confidently right: 0.85..0.97 on the true class, the rest spread.
    rest = rng.dirichlet(np.ones(c - 1), n)
    top = rng.uniform(0.85, 0.97, n)
    p = np.empty((n, c))
    for i in range(n):
        p[i, truth[i]] = top[i]
        p[i, np.arange(c) != truth[i]] = (1 - top[i]) * rest[i]
    flipped = rng.choice(n, 15, replace=False)
    labels = truth.copy()
    labels[flipped] = (truth[flipped] + rng.integers(1, c, 15)) % c  # always another class
    assert (labels[flipped] != truth[flipped]).all()

    flags = v.confident_learning(labels, p)
    assert flags.dtype == bool and flags.shape == (n,)
    is_flipped = np.zeros(n, dtype=bool)
    is_flipped[flipped] = True
    # Most (more than half) of the 15 flipped labels, and few (1%) of the 285 right ones:
    # prune-by-noise-rate removes about as many as it estimates per (label, class) cell,
    # and a cell holding one or two flips can be estimated at zero.
    assert 2 * flags[is_flipped].sum() > len(flipped)
    assert flags[~is_flipped].sum() <= 3


def test_confident_learning_flags_nothing_when_every_label_is_the_confident_class():
    rng = np.random.default_rng(10)
    labels = np.arange(200) % 10
    p = np.full((200, 10), 0.01) + rng.uniform(0, 0.001, (200, 10))
    p[np.arange(200), labels] = 0.9
    p /= p.sum(axis=1, keepdims=True)
    flags = v.confident_learning(labels, p)
    assert flags.shape == (200,) and not flags.any()


# --- votes and the verdict rule -----------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_votes_count_the_neighbours_carrying_the_class_asked_for(m, k, seed):
    rng = np.random.default_rng(seed)
    neighbour_labels = rng.integers(0, 4, (m, k))
    classes = rng.integers(0, 5, m)
    want = [list(row).count(c) for row, c in zip(neighbour_labels.tolist(), classes.tolist())]
    assert v.votes(neighbour_labels, classes).tolist() == want


def reference_verdict(flagged, votes_predicted, votes_label, k):
    """The docstring's rule, with majority as an exact fraction: more than half."""
    if Fraction(votes_label, k) > Fraction(1, 2):
        return "model-error"
    if flagged and Fraction(votes_predicted, k) > Fraction(1, 2):
        return "label-error"
    return "ambiguous"


def test_verdict_follows_the_rule_for_every_vote_split():
    seen = set()
    for k in range(1, 10):
        for vp in range(k + 1):
            for vt in range(k + 1 - vp):
                for flagged in (False, True):
                    got = v.verdict(flagged, vp, vt, k)
                    assert got == reference_verdict(flagged, vp, vt, k), (flagged, vp, vt, k)
                    seen.add(got)
    assert seen == set(v.VERDICTS)


def test_verdict_edge_cases():
    # Most neighbours carry the label: the model's mistake, flagged or not.
    assert v.verdict(True, 0, 5, 9) == v.MODEL_ERROR
    assert v.verdict(False, 4, 5, 9) == v.MODEL_ERROR
    # Exactly half is not a majority.
    assert v.verdict(False, 0, 2, 4) == v.AMBIGUOUS
    assert v.verdict(True, 2, 2, 4) == v.AMBIGUOUS
    # Flagged, neighbours split: ambiguous.
    assert v.verdict(True, 4, 3, 9) == v.AMBIGUOUS
    # Flagged and most neighbours name the prediction: the label's mistake.
    assert v.verdict(True, 5, 0, 9) == v.LABEL_ERROR
    # Every neighbour names the prediction, but confident learning does not flag it.
    assert v.verdict(False, 9, 0, 9) == v.AMBIGUOUS
    # Most neighbours name a third class.
    assert v.verdict(True, 1, 1, 9) == v.AMBIGUOUS


# --- judge and counts ---------------------------------------------------------------------


def test_judge_builds_one_record_per_index_with_its_votes_and_verdict():
    rng = np.random.default_rng(11)
    labels = np.array([0, 1, 2, 3, 4, 5])
    calibrated = random_probabilities(rng, 6, scale=0.5)
    predicted = [7, 8, 9]
    for i, p in zip([1, 3, 5], predicted):  # make the predictions known by construction
        calibrated[i, p] += 2.0
    calibrated /= calibrated.sum(axis=1, keepdims=True)
    flagged = np.array([False, True, False, True, False, False])
    indices = np.array([1, 3, 5])
    neighbour_labels = np.array([
        [7, 7, 7, 1, 0],  # index 1 (label 1, predicted 7), flagged: 3 of 5 predicted
        [3, 3, 3, 8, 8],  # index 3 (label 3, predicted 8), flagged: 3 of 5 label
        [9, 9, 9, 9, 9],  # index 5 (label 5, predicted 9), not flagged: all predicted
    ])
    records = v.judge(labels, calibrated, flagged, neighbour_labels, indices)
    assert [r["index"] for r in records] == [1, 3, 5]
    assert [r["true"] for r in records] == [1, 3, 5]
    assert [r["predicted"] for r in records] == predicted
    assert [r["flagged"] for r in records] == [True, True, False]
    assert [r["votes_predicted"] for r in records] == [3, 2, 5]
    assert [r["votes_true"] for r in records] == [1, 3, 0]
    assert [r["neighbour_labels"] for r in records] == neighbour_labels.tolist()
    assert [r["verdict"] for r in records] == [v.LABEL_ERROR, v.MODEL_ERROR, v.AMBIGUOUS]
    for r in records:
        assert r["p_predicted"] == calibrated[r["index"], r["predicted"]]
        assert r["p_true"] == calibrated[r["index"], r["true"]]
        assert r["predicted"] == int(calibrated[r["index"]].argmax())
        assert all(type(r[key]) is int for key in ("index", "true", "predicted",
                                                   "votes_predicted", "votes_true"))
        assert type(r["p_predicted"]) is float and type(r["flagged"]) is bool


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 40), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_counts_has_every_verdict_and_sums_to_the_records(m, k, seed):
    rng = np.random.default_rng(seed)
    n = m + 5
    labels = rng.integers(0, 10, n)
    calibrated = random_probabilities(rng, n)
    flagged = rng.random(n) < 0.5
    indices = np.sort(rng.choice(n, m, replace=False))
    neighbour_labels = rng.integers(0, 10, (m, k))
    records = v.judge(labels, calibrated, flagged, neighbour_labels, indices)
    assert len(records) == m
    got = v.counts(records)
    assert set(got) == {"label_errors", "ambiguous", "model_errors"}
    assert sum(got.values()) == m
    for verdict, key in [(v.LABEL_ERROR, "label_errors"), (v.AMBIGUOUS, "ambiguous"),
                         (v.MODEL_ERROR, "model_errors")]:
        assert got[key] == sum(r["verdict"] == verdict for r in records)


def test_counts_reports_zero_for_absent_verdicts():
    assert v.counts([]) == {"label_errors": 0, "ambiguous": 0, "model_errors": 0}
    assert v.counts([{"verdict": v.MODEL_ERROR}] * 3) == {
        "label_errors": 0, "ambiguous": 0, "model_errors": 3}


# --- evidence -----------------------------------------------------------------------------


def record(**overrides):
    base = {"index": 12, "true": 8, "predicted": 4, "p_predicted": 0.966, "p_true": 0.014,
            "flagged": True, "neighbour_labels": [4, 4, 8, 4, 8], "neighbours": [5, 1, 9, 2, 7],
            "votes_predicted": 3, "votes_true": 2, "verdict": v.LABEL_ERROR}
    return base | overrides


def test_evidence_names_the_counts_classes_probabilities_and_the_flag():
    words = v.evidence(record(), NAMES)
    assert words == ("3 of its 5 nearest training images are labelled Coat, long, "
                     "2 are labelled Bag, small; calibrated p(Coat, long) = 0.97, "
                     "p(Bag, small) = 0.01; confident learning flags its label")


def test_evidence_grammar_and_the_other_classes():
    one = v.evidence(record(neighbour_labels=[4, 9, 8, 9], votes_predicted=1, votes_true=1,
                            flagged=False, p_predicted=0.5049, p_true=0.3951), NAMES)
    assert one.startswith("1 of its 4 nearest training images is labelled Coat, long, "
                          "1 is labelled Bag, small")
    assert "2 are labelled otherwise" in one                       # the two labelled Ankle boot
    assert "p(Coat, long) = 0.50" in one and "p(Bag, small) = 0.40" in one
    assert one.endswith("confident learning does not flag its label")
    two = v.evidence(record(neighbour_labels=[8, 8, 9], votes_predicted=0, votes_true=2,
                            true=8, predicted=0, p_predicted=0.6, p_true=0.3), NAMES)
    assert "0 of its 3 nearest training images are labelled T-shirt/top" in two
    assert "2 are labelled Bag, small, 1 is labelled otherwise" in two
    assert "p(T-shirt/top) = 0.60" in two and "flags its label" in two


# --- the misclassified CSV ----------------------------------------------------------------


def test_misclassified_lists_index_true_predicted_confidence_by_index():
    y = np.array([3, 1, 4, 1])
    probs = np.full((4, 10), 0.01, np.float32)
    probs[0, 3] = probs[1, 7] = probs[2, 4] = probs[3, 2] = 0.91
    rows = v.misclassified(y, probs)
    assert [r[:3] for r in rows] == [(1, 1, 7), (3, 1, 2)]
    assert rows[0][3] == "0.910000"
    assert v.misclassified(y[[0, 2]], probs[[0, 2]]) == []


def csv_records(rng, n=6, k=4):
    """(rows, records) as evaluate pairs them: same images, same order."""
    rows, records = [], []
    for i in sorted(rng.choice(10_000, n, replace=False).tolist()):
        t, p = (int(c) for c in rng.choice(10, 2, replace=False))
        pp, pt = float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.0, 0.3))
        neighbour_labels = rng.integers(0, 10, k).tolist()
        vp, vt = neighbour_labels.count(p), neighbour_labels.count(t)
        flagged = bool(rng.random() < 0.5)
        rows.append((i, t, p, round(pp * 0.9, 4)))
        records.append({"index": i, "true": t, "predicted": p, "p_predicted": pp,
                        "p_true": pt, "flagged": flagged, "neighbour_labels": neighbour_labels,
                        "neighbours": rng.integers(0, 60_000, k).tolist(),
                        "votes_predicted": vp, "votes_true": vt,
                        "verdict": v.verdict(flagged, vp, vt, k)})
    return rows, records


def write_and_read(tmp_path, rows, records, names=NAMES):
    path = tmp_path / "misclassified.csv"
    write_csv(path, v.MISCLASSIFIED_HEADER, v.misclassified_rows(rows, records, names))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == v.MISCLASSIFIED_HEADER
        return list(reader)


def test_misclassified_csv_round_trips_the_records(tmp_path):
    rng = np.random.default_rng(12)
    rows, records = csv_records(rng)
    raw = write_and_read(tmp_path, rows, records)
    assert [r["true"] for r in raw] == [NAMES[r["true"]] for r in records]  # names survive
    assert [r["confidence"] for r in raw] == [str(row[3]) for row in rows]
    back = v.read_misclassified(raw, NAMES)
    assert list(back) == [r["index"] for r in records]
    for want in records:
        got = back[want["index"]]
        for key in ("index", "true", "predicted", "verdict", "flagged", "votes_predicted",
                    "votes_true", "neighbours", "neighbour_labels"):
            assert got[key] == want[key], key
        for key in ("p_predicted", "p_true"):  # six decimals
            assert abs(got[key] - want[key]) <= 5e-7 + 1e-12, key


def test_misclassified_csv_round_trips_every_verdict_and_no_neighbours(tmp_path):
    records, rows = [], []
    for i, (flagged, verdict) in enumerate([(True, v.LABEL_ERROR), (False, v.AMBIGUOUS),
                                            (True, v.MODEL_ERROR)]):
        rows.append((i, 4, 8, 0.5))
        records.append({"index": i, "true": 4, "predicted": 8, "p_predicted": 0.5,
                        "p_true": 0.25, "flagged": flagged, "neighbour_labels": [],
                        "neighbours": [], "votes_predicted": 0, "votes_true": 0,
                        "verdict": verdict})
    back = v.read_misclassified(write_and_read(tmp_path, rows, records), NAMES)
    assert [back[i]["verdict"] for i in range(3)] == [v.LABEL_ERROR, v.AMBIGUOUS, v.MODEL_ERROR]
    assert [back[i]["flagged"] for i in range(3)] == [True, False, True]
    assert all(back[i]["neighbours"] == back[i]["neighbour_labels"] == [] for i in range(3))


def test_read_misclassified_refuses_unknown_verdicts_and_flags(tmp_path):
    rng = np.random.default_rng(13)
    rows, records = csv_records(rng, n=2)
    raw = write_and_read(tmp_path, rows, records)
    with pytest.raises(ValueError, match="verdict"):
        v.read_misclassified([raw[0], raw[1] | {"verdict": "label error"}], NAMES)
    for bad in ("true", "1", "", "Yes"):
        with pytest.raises(ValueError, match="confident_learning"):
            v.read_misclassified([raw[0] | {"confident_learning": bad}], NAMES)
    with pytest.raises(KeyError):
        v.read_misclassified([raw[0] | {"true": "Coat"}], NAMES)  # not a class name


def test_misclassified_rows_refuse_a_row_that_disagrees_with_its_record():
    rng = np.random.default_rng(14)
    rows, records = csv_records(rng, n=3)
    assert len(list(v.misclassified_rows(rows, records, NAMES))) == 3
    for field in (0, 1, 2):  # index, true, predicted
        bad = list(rows)
        i, t, p, conf = bad[1]
        changed = [i, t, p]
        changed[field] = (changed[field] + 1) % 10 if field else changed[field] + 1
        bad[1] = (*changed, conf)
        with pytest.raises(ValueError, match="differ"):
            list(v.misclassified_rows(bad, records, NAMES))
    with pytest.raises(ValueError):  # one record too few
        list(v.misclassified_rows(rows, records[:-1], NAMES))


def test_a_flagged_label_is_a_label_error_only_if_the_model_believes_its_prediction():
    """Confident learning's thresholds follow the model: a weak one's can flag an image it
    gives 0.3. The model reader says "the predicted class" only above 1/2."""
    assert v.reads_predicted(True, 0.51) and not v.reads_predicted(True, 0.5)
    assert not v.reads_predicted(False, 0.99)
    labels = np.array([0, 1])
    calibrated = np.array([[0.10, 0.0, 0.45, 0.45] + [0.0] * 6,   # p(2) = 0.45, tied...
                           [0.0, 0.05, 0.0, 0.0, 0.95] + [0.0] * 5])
    calibrated[0, 2] += 0.01  # ...broken: predicted 2 at 0.46
    calibrated[0, 3] -= 0.01
    neighbour_labels = np.array([[2] * 9, [4] * 9])  # the neighbours all say the prediction
    records = v.judge(labels, calibrated, np.array([True, True]), neighbour_labels,
                      np.array([0, 1]))
    assert [r["predicted"] for r in records] == [2, 4]
    assert [r["verdict"] for r in records] == [v.AMBIGUOUS, v.LABEL_ERROR]
