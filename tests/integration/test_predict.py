"""`mnist-predict`: the installed console script, run on image files drawn in the test,
with models trained by the real pipeline (C, Keras and PyTorch), the workspace's or another
revision's read through DVC (its cache, or a remote when the cache is gone).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_cli.preprocess import load_digit
from stages.data.console import PALETTE, draw
from stages.data.npz import load_npz
from testbed.drawing import drawn_digit
from testbed.processes import sh
from tests.digits import fixture_data
from tests.hostile import png_bomb
from tests.projects import applied, copy_project, dvc, reseeded_on_a_remote

pytestmark = pytest.mark.slow

COMMAND = str(Path(sys.executable).parent / "mnist-predict")
# Formats a user's files come in, one digit each. MNIST-like strokes: a pen 1/10 of the
# digit's height, the digit off-centre in a page three times its size, dark on light.
DRAWN = {"0": ".png", "1": ".jpg", "2": ".bmp", "3": ".gif", "4": ".webp", "7": ".png"}


def predict(repo: Path, *args, check: bool = True):
    return sh(repo, COMMAND, *map(str, args), check=check)


@pytest.fixture(scope="module")
def drawings(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("drawings")
    files = {}
    for digit, ext in DRAWN.items():
        image = drawn_digit(digit, size=(1200, 900), box=(60, 420, 360, 860), width=40,
                            noise=6)
        path = folder / f"digit-{digit}{ext}"
        (image.convert("RGB") if ext == ".jpg" else image).save(path)
        files[digit] = path
    return files


def test_digits_drawn_off_centre_on_a_page_are_read(reader_project, drawings):
    run = predict(reader_project, *drawings.values())
    lines = run.stdout.splitlines()
    assert len(lines) == len(drawings) and run.stderr == ""
    for line, (digit, path) in zip(lines, drawings.items()):
        # e.g. "/tmp/.../digit-7.png: 7 (99.1%), runner-up 9 (0.4%)"
        head, _, rest = line.rpartition(": ")
        assert head == str(path)
        predicted, _, runner = rest.partition(", runner-up ")
        assert predicted.split()[0] == digit, line
        assert runner.split()[0] != digit and runner.endswith("%)")


def test_json_has_every_probability_and_show_draws_what_the_model_saw(reader_project,
                                                                      drawings):
    files = list(drawings.values())[:3]
    results = json.loads(predict(reader_project, "--json", *files).stdout)
    assert [r["file"] for r in results] == [str(f) for f in files]
    for r in results:
        p = r["probabilities"]
        assert list(p) == [str(d) for d in range(10)]
        assert abs(sum(p.values()) - 1) < 1e-4
        ranked = sorted(p, key=p.get, reverse=True)
        assert [r["prediction"], r["runner_up"]] == ranked[:2]
        assert (r["probability"], r["runner_up_probability"]) == (p[ranked[0]], p[ranked[1]])
    shown = predict(reader_project, "--show", files[0]).stdout.splitlines()
    assert len(shown) == 1 + 28 and all(len(row) == 28 and set(row) <= set(PALETTE)
                                        for row in shown[1:])
    assert "\n".join(shown[1:]) == draw(load_digit(files[0]) * 255)


def test_bad_files_get_one_line_each_and_the_others_are_still_read(reader_project, drawings,
                                                                    tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image\n")
    white = tmp_path / "white.png"
    Image.new("L", (640, 480), 255).save(white)
    bomb = png_bomb(tmp_path / "bomb.png")
    missing = tmp_path / "missing.jpg"
    good = drawings["7"]
    run = predict(reader_project, missing, notes, good, white, bomb, check=False)
    assert run.returncode == 1
    assert run.stdout == predict(reader_project, good).stdout
    errors = run.stderr.splitlines()
    assert [e.split(": ")[1] for e in errors] == [str(p) for p in (missing, notes, white, bomb)]
    assert all(e.startswith("error: ") for e in errors)
    assert "no such file" in errors[0] and "not an image" in errors[1]
    assert "blank" in errors[2] and "20000×20000 pixels" in errors[3]
    # --json keeps the order and says what went wrong where.
    listed = json.loads(predict(reader_project, "--json", notes, good, check=False).stdout)
    assert "not an image" in listed[0]["error"] and listed[1]["prediction"] == "7"


def test_many_files_are_read_in_batches_and_answered_in_order(reader_project, tmp_path):
    """500 MNIST test images and two bad files, past two batch boundaries (BATCH 256)."""
    data = fixture_data()
    files = []
    for i, image in enumerate(data["x_test"]):
        files.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(image).save(files[-1])
    files[255:255] = [tmp_path / "missing-1.png"]
    files[300:300] = [tmp_path / "missing-2.png"]
    run = predict(reader_project, *files, check=False)
    assert run.returncode == 1 and len(run.stderr.splitlines()) == 2
    lines = run.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [
        str(f) for f in files if "missing" not in f.name]
    answers = np.array([int(line.split(": ")[1].split()[0]) for line in lines])
    assert np.mean(answers == data["y_test"]) > 0.85  # the reader's test accuracy: 91.6%


def test_no_model_is_one_line(tmp_path, drawings):
    run = predict(tmp_path, drawings["7"], check=False)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("error: data/model: no model folder") and \
        run.stderr.count("\n") == 1


# --- any framework's model: the command's probabilities are evaluate's ------------------


def unchanged_test_images(folder: Path, count: int = 8) -> list[tuple[int, Path]]:
    """MNIST test images saved as PNG files whose preprocessing leaves them as they are."""
    images = fixture_data()["x_test"]
    picked = []
    for i, image in enumerate(images):
        path = folder / f"test-{i}.png"
        Image.fromarray(image).save(path)
        if np.abs(load_digit(path) - image / 255).max() < 0.01:
            picked.append((i, path))
        if len(picked) == count:
            break
    return picked


def assert_agrees_with_evaluate(repo: Path, folder: Path) -> None:
    picked = unchanged_test_images(folder)
    evaluated = load_npz(repo / "data/predictions.npz", ("probabilities",))["probabilities"]
    results = json.loads(predict(repo, "--json", *(p for _, p in picked)).stdout)
    for (i, _), r in zip(picked, results):
        p = np.array(list(r["probabilities"].values()))
        assert np.abs(p - evaluated[i]).max() < 0.02, (i, p, evaluated[i])
        assert r["prediction"] == str(int(evaluated[i].argmax()))


def test_a_c_model_reads_mnist_as_evaluate_did(reader_project, tmp_path):
    assert_agrees_with_evaluate(reader_project, tmp_path)


def test_a_keras_model_reads_mnist_as_evaluate_did(trained_project, tmp_path):
    assert_agrees_with_evaluate(trained_project.repo, tmp_path)


def test_a_pytorch_model_reads_mnist_as_evaluate_did(switched, tmp_path):
    repo, _ = applied(switched, ("torch", "cnn"), tmp_path)  # the README's PyTorch run
    assert_agrees_with_evaluate(repo, tmp_path)


# --- another revision's model, through DVC ------------------------------------------------


def probabilities(run) -> list[dict]:
    return [r["probabilities"] for r in json.loads(run.stdout)]


def test_rev_reads_another_commits_model_from_the_cache_then_the_remote(reader_project,
                                                                       drawings, tmp_path):
    files = list(drawings.values())
    before = probabilities(predict(reader_project, "--json", *files))
    repo, remote = reseeded_on_a_remote(reader_project, tmp_path / "project", seed=7)
    after = probabilities(predict(repo, "--json", *files))
    assert after != before  # another seed, another model
    assert probabilities(predict(repo, "--json", "--rev", "HEAD~1", *files)) == before
    assert probabilities(predict(repo, "--json", "--rev", "HEAD", *files)) == after

    # The cache gone, the data on the remote: the same answers, nothing retrained.
    sh(repo, "rm", "-rf", ".dvc/cache", "data/model")
    assert probabilities(predict(repo, "--json", "--rev", "HEAD~1", *files)) == before
    assert not (repo / "data" / "model").exists() and not (repo / ".dvc" / "cache").exists()

    # Without the remote either: one line naming what is missing where.
    sh(repo, "rm", "-rf", str(remote))
    run = predict(repo, "--rev", "HEAD~1", files[0], check=False)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("error: data/model at HEAD~1: its data is in neither")
    run = predict(repo, "--rev", "no-such-rev", files[0], check=False)
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert run.stderr.startswith("error: ")


def test_rev_takes_an_experiment_name(reader_project, drawings, tmp_path):
    repo = copy_project(reader_project, tmp_path / "project")
    dvc(repo, "exp", "run", "-n", "seed-3", "-S", "train.seed=3", "evaluate")
    files = list(drawings.values())
    from_exp = probabilities(predict(repo, "--json", "--rev", "seed-3", *files))
    # The experiment's results are in the workspace too after `dvc exp run`; its base
    # commit's model is another one.
    assert from_exp == probabilities(predict(repo, "--json", *files))
    assert from_exp != probabilities(predict(repo, "--json", "--rev", "HEAD", *files))
