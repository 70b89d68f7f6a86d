"""stages/normalize.py: scale the pixels, report per-split statistics, print and save a sample."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from stages import normalize
from stages.data.console import draw
from stages.data.mnist import MNIST_KEYS, load_processed, scale
from stages.runtime.failures import DataError
from testbed.pipeline import copy_pipeline, stage_command
from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.digits import NAMED_CLASSES, fixture_data, small_mnist
from tests.hostile import MakesMarker
from tests.paths import FIXTURE
from tests.projects import set_params

PATHS = dvc_vars()


def test_normalize_scales_images_keeps_labels_and_splits_as_they_are():
    data = small_mnist(60, 20)
    out, _ = normalize.normalize(data)
    assert tuple(out) == MNIST_KEYS  # no validation split here: that is train's choice
    for split in ("train", "test"):
        assert np.array_equal(out[f"x_{split}"], scale(data[f"x_{split}"]))
        assert np.array_equal(out[f"y_{split}"], data[f"y_{split}"])
        assert out[f"y_{split}"].dtype == np.uint8


def test_report_counts_classes_and_raw_pixel_statistics():
    data = small_mnist(60, 20)
    _, report = normalize.normalize(data)
    assert set(report) == {"train", "test"}
    for split in ("train", "test"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        part = report[split]
        assert part["count"] == len(y)
        assert part["class_counts"] == {str(c): int((y == c).sum()) for c in range(10)}
        assert sum(part["class_counts"].values()) == len(y)
        assert part["pixel_mean"] == round(float(x.astype(np.float64).mean()), 6)
        assert part["pixel_std"] == pytest.approx(float(x.astype(np.float64).std()), abs=1e-5)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_normalize_refuses_non_finite_pixels(value):
    data = small_mnist()
    data["x_test"] = data["x_test"].astype(np.float32)
    data["x_test"][2, 0, 0] = value
    with pytest.raises(DataError, match="^x_test: holds NaN or infinite values$"):
        normalize.normalize(data)


def test_summary_prints_what_the_original_printed_with_class_names():
    data = small_mnist(60, 20)
    data["x_train"][3] = 0
    data["x_train"][3, 10, 5] = 255
    text = normalize.summary(data, 3, NAMED_CLASSES)
    assert "x_train: shape (60, 28, 28), dtype uint8" in text
    assert f"label of training sample 3: {NAMED_CLASSES[data['y_train'][3]]}\n" in text
    assert "pixel min 0, max 255" in text
    assert text.endswith(draw(data["x_train"][3]))
    assert text.splitlines()[-28 + 10][5] == "@"


# --- through the stage's command line ---------------------------------------------------


def project(tmp_path, **sections):
    """The pipeline in a scratch folder with the fixture as its raw data."""
    repo = copy_pipeline(tmp_path / "p")
    if sections:
        set_params(repo, **sections)
    (repo / PATHS["raw"]).parent.mkdir(parents=True)
    shutil.copy(FIXTURE, repo / PATHS["raw"])
    return repo


def outputs(repo) -> list:
    return [repo / PATHS[key] for key in ("processed", "data_report", "sample")]


@pytest.mark.slow
def test_cli_writes_scaled_data_report_and_sample_byte_stably(tmp_path):
    repo = project(tmp_path, normalize={"sample_index": 3},
                   dataset={"classes": NAMED_CLASSES})
    proc = sh(repo, *stage_command("normalize", repo), timeout=120)
    raw = fixture_data()
    got = load_processed(repo / PATHS["processed"])
    for split in ("train", "test"):
        assert np.array_equal(got[f"x_{split}"], scale(raw[f"x_{split}"]))
        assert np.array_equal(got[f"y_{split}"], raw[f"y_{split}"])
    report = json.loads((repo / PATHS["data_report"]).read_text())
    assert report == normalize.stats(raw)
    assert (report["train"]["count"], report["test"]["count"]) == (1500, 500)
    with Image.open(repo / PATHS["sample"]) as sample:
        assert sample.format == "BMP" and np.array_equal(np.asarray(sample), raw["x_train"][3])
    assert f"label of training sample 3: {NAMED_CLASSES[raw['y_train'][3]]}" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"1500 train, 500 test images -> {PATHS['processed']}")
    first = [p.read_bytes() for p in outputs(repo)]
    sh(repo, *stage_command("normalize", repo), timeout=120)
    assert [p.read_bytes() for p in outputs(repo)] == first


@pytest.mark.slow
def test_cli_refuses_a_sample_index_beyond_the_data(tmp_path):
    repo = project(tmp_path, normalize={"sample_index": 1500})
    proc = sh(repo, *stage_command("normalize", repo), check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == ("error: normalize.sample_index: got 1500; allowed: 0 to 1499\n")
    assert not any(p.exists() for p in outputs(repo))


@pytest.mark.slow
def test_cli_refuses_a_booby_trapped_raw_file(tmp_path):
    repo = project(tmp_path)
    marker = tmp_path / "unpickled.marker"
    data = small_mnist()
    data["x_train"] = np.array([MakesMarker(str(marker))], dtype=object)
    np.savez(repo / PATHS["raw"], **data)
    proc = sh(repo, *stage_command("normalize", repo), check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == (f"error: {PATHS['raw']}: holds object arrays; refused "
                           "(never unpickled)\n")
    assert not marker.exists()
    assert not any(p.exists() for p in outputs(repo))
