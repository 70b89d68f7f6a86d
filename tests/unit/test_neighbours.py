"""stages/analysis/neighbours.py: exact nearest training images of a class, whatever the
chunking."""

from __future__ import annotations

import numpy as np
import pytest

from stages.analysis.neighbours import nearest_by_class, squared_distances
from tests.helpers import fixture_data


def reference_nearest(queries, train_x, train_y, classes, k):
    """Brute force: sort every training image of the class by (distance, index)."""
    m, s = classes.shape
    idx = np.full((m, s, k), -1, dtype=np.int64)
    dist = np.full((m, s, k), -1, dtype=np.int64)
    for i in range(m):
        all_d = squared_distances(queries[i : i + 1], train_x)[0]  # one query: small memory
        for j in range(s):
            members = np.flatnonzero(train_y == classes[i, j])
            order = sorted(members.tolist(), key=lambda t: (all_d[t], t))[:k]
            idx[i, j, : len(order)] = order
            dist[i, j, : len(order)] = all_d[order]
    return idx, dist


@pytest.fixture(scope="module")
def data():
    return fixture_data()


def test_squared_distances_is_the_sum_of_squared_pixel_differences():
    a = np.array([[[0, 3], [4, 0]]], np.uint8)
    b = np.array([[[0, 0], [0, 0]], [[255, 3], [4, 1]]], np.uint8)
    assert squared_distances(a, b).tolist() == [[3 * 3 + 4 * 4, 255 * 255 + 1]]


@pytest.mark.parametrize("seed", range(6))
def test_neighbours_match_brute_force_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n, m, side = int(rng.integers(5, 80)), int(rng.integers(1, 30)), int(rng.integers(2, 6))
    # Few distinct pixel values: many exact ties, which must go to the lower index.
    levels = np.array([0, 1, 128, 255], dtype=np.uint8)[: int(rng.integers(2, 5))]
    train_x = rng.choice(levels, size=(n, side, side))
    train_y = rng.integers(0, 4, n).astype(np.uint8)
    queries = rng.choice(levels, size=(m, side, side))
    classes = rng.integers(0, 5, (m, 2))  # class 4 has no training images at all
    k = int(rng.integers(1, 8))
    got = nearest_by_class(queries, train_x, train_y, classes, k)
    want = reference_nearest(queries, train_x, train_y, classes, k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_neighbours_only_come_from_the_requested_class(data):
    queries = data["x_test"][:40]
    classes = np.stack([data["y_test"][:40], (data["y_test"][:40] + 3) % 10], axis=1)
    idx, dist = nearest_by_class(queries, data["x_train"], data["y_train"], classes, 5)
    assert (idx >= 0).all()
    np.testing.assert_array_equal(data["y_train"][idx], np.repeat(classes[:, :, None], 5, 2))
    assert (np.diff(dist, axis=2) >= 0).all()  # nearest first
    ref = reference_nearest(queries, data["x_train"], data["y_train"], classes, 5)
    np.testing.assert_array_equal(idx, ref[0])
    np.testing.assert_array_equal(dist, ref[1])


@pytest.mark.parametrize("query_chunk,train_chunk", [(1, 1), (3, 7), (16, 50), (1000, 5000)])
def test_chunking_never_changes_the_result(data, query_chunk, train_chunk):
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 10, (60, 2))
    whole = nearest_by_class(data["x_test"][:60], data["x_train"], data["y_train"], classes, 4,
                             query_chunk=10**6, train_chunk=10**6)
    chunked = nearest_by_class(data["x_test"][:60], data["x_train"], data["y_train"], classes,
                               4, query_chunk=query_chunk, train_chunk=train_chunk)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


def test_distance_is_squared_euclidean_on_raw_pixels():
    query = np.zeros((1, 28, 28), dtype=np.uint8)
    a = np.zeros((28, 28), dtype=np.uint8)
    a[0, 0] = 200                       # L1 200, squared L2 40000
    b = np.zeros((28, 28), dtype=np.uint8)
    b[1, :4] = 60                       # L1 240, squared L2 14400: nearer only under L2
    full = np.full((28, 28), 255, dtype=np.uint8)  # the largest possible distance
    train = np.stack([a, b, full])
    idx, dist = nearest_by_class(query, train, np.zeros(3, np.uint8), np.array([[0]]), 3)
    assert idx[0, 0].tolist() == [1, 0, 2]
    assert dist[0, 0].tolist() == [14400, 40000, 784 * 255 * 255]  # exact, no rounding


def test_missing_neighbours_are_padded():
    train = np.zeros((3, 28, 28), dtype=np.uint8)
    idx, dist = nearest_by_class(train[:1], train, np.array([0, 0, 1]), np.array([[0, 1, 2]]), 3)
    assert idx[0].tolist() == [[0, 1, -1], [2, -1, -1], [-1, -1, -1]]
    assert dist[0].tolist() == [[0, 0, -1], [0, -1, -1], [-1, -1, -1]]


def test_a_one_dimensional_class_list_means_one_slot():
    train = np.stack([np.full((2, 2), v, np.uint8) for v in (0, 10, 20)])
    idx, dist = nearest_by_class(train[2:], train, np.array([0, 0, 1]), np.array([0]), 2)
    assert idx.tolist() == [[[1, 0]]] and dist.tolist() == [[[4 * 100, 4 * 400]]]


def test_neighbour_search_refuses_normalized_images_bad_k_and_mismatched_inputs():
    x = np.zeros((2, 28, 28), dtype=np.float32)
    with pytest.raises(ValueError, match="integers"):
        nearest_by_class(x, x, np.zeros(2), np.zeros((2, 1)), 1)
    u = x.astype(np.uint8)
    with pytest.raises(ValueError, match=">= 1"):
        nearest_by_class(u, u, np.zeros(2), np.zeros((2, 1)), 0)
    with pytest.raises(ValueError, match="2 queries but 3 rows of classes"):
        nearest_by_class(u, u, np.zeros(2), np.zeros((3, 1)), 1)
    with pytest.raises(ValueError, match="differ in size, or labels in count"):
        nearest_by_class(u, u, np.zeros(3), np.zeros((2, 1)), 1)
    with pytest.raises(ValueError, match="0..255"):
        nearest_by_class(u.astype(np.int16) - 1, u, np.zeros(2), np.zeros((2, 1)), 1)


def test_no_queries_give_empty_results():
    train = np.zeros((3, 28, 28), dtype=np.uint8)
    idx, dist = nearest_by_class(train[:0], train, np.zeros(3), np.zeros((0, 2), int), 3)
    assert idx.shape == dist.shape == (0, 2, 3)
