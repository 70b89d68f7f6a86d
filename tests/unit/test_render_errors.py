"""stages/render_errors.py: the error analysis, and the stage itself.

The mosaics, neighbour search, tables, sheets and page have their own test files; here the
analysis, the stage's input checks and its outputs end to end.
"""

from __future__ import annotations

import csv
import html
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import render_errors
from stages.analysis import scoring, verdicts
from stages.analysis import sheets as error_sheets
from stages.render_errors import analyse, read_table
from stages.runtime.failures import DataError
from stages.runtime.outputs import save_npz, write_csv
from testbed.pipeline import copy_pipeline, stage_command
from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.digits import NAMED_CLASSES, centroid_probabilities, fixture_data
from tests.paths import FIXTURE
from tests.projects import set_params

PATHS = dvc_vars()

# --- analyse -----------------------------------------------------------------------------


def test_analyse_gives_every_error_its_neighbours_of_both_classes():
    data = fixture_data()
    probabilities = centroid_probabilities(data)
    records = analyse(data, probabilities, 2)
    wrong = np.flatnonzero(probabilities.argmax(1) != data["y_test"])
    assert sorted(r["index"] for r in records) == wrong.tolist()
    for r in records:
        assert (data["y_train"][r["true_neighbours"]] == r["true"]).all()
        assert (data["y_train"][r["pred_neighbours"]] == r["predicted"]).all()
        assert len(r["true_l2"]) == len(r["pred_l2"]) == 2
        assert r["nearer"] in ("true", "predicted", "tie")


def test_analyse_without_errors_is_empty():
    data = fixture_data()
    perfect = np.eye(10, dtype=np.float32)[data["y_test"]]
    assert analyse(data, perfect, 3) == []


# --- evaluate's tables, read back --------------------------------------------------------


def evaluate_tables(folder: Path, data: dict, probabilities: np.ndarray, names) -> None:
    """classes.csv, confusion_pairs.csv and misclassified.csv as evaluate writes them
    (its own functions; the verdicts without a validation split)."""
    from stages.normalize import normalize

    y, y_pred = data["y_test"], probabilities.argmax(1)
    write_csv(folder / PATHS["classes"], scoring.CLASS_HEADER,
              scoring.class_rows(scoring.class_table(y, y_pred, names)))
    write_csv(folder / PATHS["pairs"], scoring.PAIR_HEADER,
              scoring.pair_rows(scoring.confusion_pairs(y, y_pred, names)))
    records, _ = verdicts.judge_errors(normalize(data)[0], probabilities, None, None, 9)
    write_csv(folder / PATHS["misclassified"], verdicts.MISCLASSIFIED_HEADER,
              verdicts.misclassified_rows(verdicts.misclassified(y.astype(np.int64),
                                                                 probabilities),
                                          records, names))


def test_read_table_reads_evaluates_tables_back(tmp_path):
    data = fixture_data()
    probabilities = centroid_probabilities(data)
    evaluate_tables(tmp_path, data, probabilities, NAMED_CLASSES)
    rates = read_table(tmp_path / PATHS["classes"], scoring.read_class_rows,
                       scoring.CLASS_HEADER)
    assert [r["class"] for r in rates] == NAMED_CLASSES
    y_pred = probabilities.argmax(1)
    assert [r["errors"] for r in rates] == [
        int(((data["y_test"] == c) & (y_pred != c)).sum()) for c in range(10)]
    pairs = read_table(tmp_path / PATHS["pairs"], scoring.read_pair_rows, scoring.PAIR_HEADER)
    assert sum(p["count"] for p in pairs) == int((y_pred != data["y_test"]).sum())


@pytest.mark.parametrize("content, match", [
    (None, "file not found"),
    ("a,b\n1,2\n", r"header \['a', 'b'\], expected \['class'"),
    (",".join(scoring.CLASS_HEADER) + "\n0,zero,1,0,0,0,0\n", "unreadable table"),
    (",".join(scoring.CLASS_HEADER) + "\n0,0,1\n", "unreadable table"),
    (b"\xff\xfe".decode("latin-1"), "unreadable table|header"),
], ids=["missing", "header", "not-a-number", "short-row", "not-utf8"])
def test_read_table_refuses_a_bad_table(tmp_path, content, match):
    path = tmp_path / "classes.csv"
    if content is not None:
        path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match=f"^{path}: ({match})"):
        read_table(path, scoring.read_class_rows, scoring.CLASS_HEADER)


# --- the stage ---------------------------------------------------------------------------


def project(folder: Path) -> Path:
    """The pipeline with render-errors' inputs in place: the fixture as raw data, centroid
    predictions and evaluate's tables, classes named (with a comma and markup)."""
    repo = copy_pipeline(folder)
    set_params(repo, dataset={"classes": NAMED_CLASSES})
    data = fixture_data()
    probabilities = centroid_probabilities(data)
    (repo / PATHS["raw"]).parent.mkdir(parents=True)
    shutil.copy(FIXTURE, repo / PATHS["raw"])
    save_npz(repo / PATHS["predictions"], probabilities=probabilities)
    evaluate_tables(repo, data, probabilities, NAMED_CLASSES)
    return repo


OUTPUTS = ("mosaics", "error_plots", "confident", "neighbours", "page")


def render_argv(repo: Path) -> list[str]:
    """render-errors' arguments from dvc.yaml, made absolute under repo."""
    argv = stage_command("render-errors", repo)[3:]
    return [a if a.startswith("--") else str(repo / a) for a in argv]


def nothing_written(repo: Path) -> bool:
    return not any((repo / PATHS[key]).exists() for key in OUTPUTS)


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """The stage run (twice) through its command line, outside DVC."""
    repo = project(tmp_path_factory.mktemp("render") / "p")
    first = sh(repo, *stage_command("render-errors", repo), timeout=300)
    files = sorted(p for p in (repo / "reports").rglob("*") if p.is_file())
    snapshot = {p: p.read_bytes() for p in files}
    sh(repo, *stage_command("render-errors", repo), timeout=300)
    return repo, first, snapshot


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_stage_writes_every_output_byte_reproducibly(stage_run):
    repo, first, snapshot = stage_run
    for key in ("confident", "neighbours", "page"):
        assert (repo / PATHS[key]).is_file(), key
    for c in range(10):
        for name in (f"train_{c}.bmp", f"test_{c}.bmp", f"test_error_{c}.bmp"):
            assert Image.open(repo / PATHS["mosaics"] / name).format == "BMP"
        for name in (f"test_error_{c}.png", f"sheet_{c}.png"):
            assert Image.open(repo / PATHS["error_plots"] / name).format == "PNG"
    now = sorted(p for p in (repo / "reports").rglob("*") if p.is_file())
    assert now == sorted(snapshot)
    for path in now:
        assert path.read_bytes() == snapshot[path], f"{path} differs between two runs"
    assert f"30 mosaics -> {PATHS['mosaics']}" in first.stdout
    assert first.stderr == ""


@pytest.mark.slow
def test_stage_tables_agree_with_each_other_and_name_the_classes(stage_run):
    repo, first, _ = stage_run
    data = fixture_data()
    probabilities = centroid_probabilities(data)
    wrong = int((probabilities.argmax(1) != data["y_test"]).sum())
    neighbours = read_csv(repo / PATHS["neighbours"])
    assert len(neighbours) == wrong
    nearer = sum(r["nearer"] == "predicted" for r in neighbours)
    assert f"render-errors: {wrong} errors, {nearer} nearer a training image" in first.stdout
    for row in neighbours:
        assert row["true"] in NAMED_CLASSES and row["predicted"] in NAMED_CLASSES
        for key, column in (("true", "true"), ("pred", "predicted")):
            ids = [int(i) for i in row[f"{key}_neighbours"].split()]
            assert len(ids) == 3
            assert (data["y_train"][ids] == NAMED_CLASSES.index(row[column])).all()
            dists = [float(v) for v in row[f"{key}_l2"].split()]
            assert dists == sorted(dists)
    assert NAMED_CLASSES[4] in {r["true"] for r in neighbours}  # "Coat, long", one field
    confident = read_csv(repo / PATHS["confident"])
    assert len(confident) == min(20, wrong)
    conf = [float(r["confidence"]) for r in confident]
    assert conf == sorted(conf, reverse=True)
    assert conf[0] == max(float(r["confidence"]) for r in neighbours)
    page = (repo / PATHS["page"]).read_text()
    assert f"<b>{wrong}</b> of 500 test images are misclassified" in page
    assert html.escape(NAMED_CLASSES[6]) in page and NAMED_CLASSES[6] not in page
    # Every error's verdict, as evaluate gave it, in the confident table and on the page,
    # each with its evidence in words.
    judged = {int(r["index"]): r for r in read_csv(repo / PATHS["misclassified"])}
    for row in confident:
        assert row["verdict"] == judged[int(row["index"])]["verdict"]
    for verdict in verdicts.VERDICTS:
        n = sum(r["verdict"] == verdict for r in judged.values())
        assert f'<h3 id="{verdict}">' in page and f": {n}</h3>" in page
    names = {name: c for c, name in enumerate(NAMED_CLASSES)}
    for r in judged.values():
        record = verdicts.read_misclassified([r], NAMED_CLASSES)[int(r["index"])]
        assert html.escape(verdicts.evidence(record, NAMED_CLASSES)) in page
        assert names[r["predicted"]] != names[r["true"]]


@pytest.mark.slow
def test_stage_sheet_and_mosaic_heights_match_error_counts(stage_run):
    repo, _, _ = stage_run
    neighbours = read_csv(repo / PATHS["neighbours"])
    header = error_sheets.PAD + 2 * error_sheets.LINE_H + error_sheets.PAD
    for c, name in enumerate(NAMED_CLASSES):
        n = sum(r["true"] == name for r in neighbours)
        _, height = Image.open(repo / PATHS["error_plots"] / f"sheet_{c}.png").size
        assert height == header + n * (error_sheets.TILE + error_sheets.PAD) + (
            error_sheets.PAD if n else 0)
        _, rows = Image.open(repo / PATHS["mosaics"] / f"test_error_{c}.bmp").size
        assert rows == max(1, math.ceil(n / 10)) * 28


@pytest.mark.parametrize("break_input, match", [
    (lambda repo: save_npz(repo / PATHS["predictions"],
                           probabilities=np.full((500, 9), 0.1, np.float32)),
     r"shape \(500, 9\) does not match the 500 test images and 10 classes"),
    (lambda repo: save_npz(repo / PATHS["predictions"],
                           probabilities=np.full((500, 10), np.nan, np.float32)),
     "holds NaN or infinite values"),
    (lambda repo: (repo / PATHS["classes"]).write_text(
        (repo / PATHS["classes"]).read_text().rsplit("\n", 2)[0] + "\n"),
     r"one row per class label 0\.\.9 expected"),
    (lambda repo: (repo / PATHS["pairs"]).unlink(), "file not found"),
    (lambda repo: (repo / PATHS["misclassified"]).write_text(
        (repo / PATHS["misclassified"]).read_text().rsplit("\n", 2)[0] + "\n"),
     "lists other images than the predictions' errors"),
    (lambda repo: (repo / PATHS["misclassified"]).write_text(
        (repo / PATHS["misclassified"]).read_text().replace("ambiguous", "unsure")),
     "unreadable table"),
], ids=["shape", "nan", "missing-class-row", "no-pairs", "other-errors", "bad-verdict"])
def test_stage_refuses_bad_inputs_before_writing_anything(tmp_path, monkeypatch, break_input,
                                                         match):
    repo = project(tmp_path / "p")
    break_input(repo)
    monkeypatch.chdir(repo)  # params.yaml is read from the working directory
    with pytest.raises(DataError, match=match):
        render_errors.main(render_argv(repo))
    assert nothing_written(repo)
