"""stages/analysis/neighbours.py: exact nearest training images of a class (nearest_by_class)
or of any class with one excluded per query (nearest), whatever the chunking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.analysis.neighbours import nearest, nearest_by_class, squared_distances
from tests.digits import fixture_data


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


# --- nearest: any class, one training index excluded per query ---------------------------


def reference_any(queries, train_x, k, exclude=None):
    """Brute force: every training image by (distance, index), the excluded one removed."""
    idx = np.full((len(queries), k), -1, dtype=np.int64)
    dist = np.full((len(queries), k), -1, dtype=np.int64)
    for i in range(len(queries)):
        row = squared_distances(queries[i : i + 1], train_x)[0]  # one query: small memory
        order = [t for t in np.argsort(row, kind="stable").tolist()
                 if exclude is None or t != exclude[i]][:k]
        idx[i, : len(order)] = order
        dist[i, : len(order)] = row[order]
    return idx, dist


def random_images(rng, n, side, levels):
    return rng.choice(levels, size=(n, side, side)).astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_nearest_matches_brute_force_with_ties_and_duplicates(seed):
    rng = np.random.default_rng(100 + seed)
    n, m, side = int(rng.integers(5, 60)), int(rng.integers(1, 25)), int(rng.integers(2, 6))
    levels = np.array([0, 1, 128, 255], dtype=np.uint8)[: int(rng.integers(2, 5))]
    train_x = random_images(rng, n, side, levels)
    # Duplicate training images: equal distances, to be ordered by the lower index.
    train_x = np.concatenate([train_x, train_x[rng.integers(0, n, 5)]])
    queries = np.concatenate([random_images(rng, m, side, levels), train_x[:3]])
    k = int(rng.integers(1, 10))
    idx, dist = nearest(queries, train_x, k)
    want = reference_any(queries, train_x, k)
    assert idx.shape == dist.shape == (len(queries), k)
    assert idx.dtype == dist.dtype == np.int64
    np.testing.assert_array_equal(idx, want[0])
    np.testing.assert_array_equal(dist, want[1])
    assert (np.diff(dist, axis=1) >= 0).all()


def test_nearest_on_the_fixture_matches_brute_force(data):
    queries = data["x_test"][:30]
    idx, dist = nearest(queries, data["x_train"], 7)
    want = reference_any(queries, data["x_train"], 7)
    np.testing.assert_array_equal(idx, want[0])
    np.testing.assert_array_equal(dist, want[1])


def test_nearest_exact_ties_go_to_the_lower_index():
    train = np.stack([np.full((2, 2), v, np.uint8) for v in (10, 0, 20, 0, 10, 0)])
    idx, dist = nearest(np.zeros((1, 2, 2), np.uint8), train, 5)
    assert idx.tolist() == [[1, 3, 5, 0, 4]]
    assert dist.tolist() == [[0, 0, 0, 4 * 100, 4 * 100]]


def test_nearest_excludes_exactly_the_given_index():
    rng = np.random.default_rng(7)
    train_x = random_images(rng, 40, 3, np.array([0, 1, 128, 255], np.uint8))
    train_x[30] = train_x[4]  # a duplicate of query 4: still found, at distance 0
    own = np.array([4, 0, 17, 39, 30])
    queries = train_x[own]
    for k in (1, 3, 8):
        idx, dist = nearest(queries, train_x, k, exclude=own)
        assert not (idx == own[:, None]).any()  # never the query itself
        want = reference_any(queries, train_x, k, exclude=own)
        np.testing.assert_array_equal(idx, want[0])
        np.testing.assert_array_equal(dist, want[1])
        # The duplicate pair finds each other first.
        assert idx[0, 0] == 30 and dist[0, 0] == 0
        assert idx[4, 0] == 4 and dist[4, 0] == 0
        # Without the exclusion each query finds itself (or its lower-index twin) first.
        first, _ = nearest(queries, train_x, k)
        assert first[:, 0].tolist() == [4, 0, 17, 39, 4]
        # Exclusion drops one place and shifts the rest up: nothing else changes.
        full, full_d = nearest(queries, train_x, k + 1)
        for i in range(len(own)):
            kept = [t for t in full[i].tolist() if t != own[i]][:k]
            assert idx[i].tolist() == kept
            assert dist[i].tolist() == [int(full_d[i, full[i].tolist().index(t)]) for t in kept]


def test_nearest_exclude_minus_one_means_none():
    rng = np.random.default_rng(8)
    train_x = random_images(rng, 20, 3, np.array([0, 255], np.uint8))
    queries = train_x[:6]
    plain = nearest(queries, train_x, 4)
    none = nearest(queries, train_x, 4, exclude=np.full(6, -1))
    np.testing.assert_array_equal(plain[0], none[0])
    np.testing.assert_array_equal(plain[1], none[1])
    # Mixed: only the rows with an index drop it.
    mixed, _ = nearest(queries, train_x, 4, exclude=[0, -1, 2, -1, -1, 5])
    want, _ = reference_any(queries, train_x, 4, exclude=[0, -1, 2, -1, -1, 5])
    np.testing.assert_array_equal(mixed, want)


def test_nearest_pads_when_there_are_fewer_than_k_training_images():
    train = np.stack([np.full((2, 2), v, np.uint8) for v in (0, 3, 1)])
    query = np.zeros((1, 2, 2), np.uint8)
    idx, dist = nearest(query, train, 5)
    assert idx.tolist() == [[0, 2, 1, -1, -1]]
    assert dist.tolist() == [[0, 4 * 1, 4 * 9, -1, -1]]
    # Excluding one of exactly k training images leaves one place empty.
    idx, dist = nearest(query, train, 3, exclude=[0])
    assert idx.tolist() == [[2, 1, -1]] and dist.tolist() == [[4, 36, -1]]
    # No training images at all: every place empty.
    idx, dist = nearest(query, train[:0], 2)
    assert idx.tolist() == dist.tolist() == [[-1, -1]]


def test_nearest_with_no_queries_gives_empty_results():
    train = np.zeros((3, 28, 28), dtype=np.uint8)
    idx, dist = nearest(train[:0], train, 3)
    assert idx.shape == dist.shape == (0, 3)


@pytest.mark.parametrize("query_chunk,train_chunk", [(3, 5), (1, 1), (2, 7), (1000, 5000)])
def test_nearest_chunking_never_changes_the_result(data, query_chunk, train_chunk):
    queries = data["x_train"][:40]
    own = np.arange(40)
    own[::3] = -1
    whole = nearest(queries, data["x_train"][:300], 6, exclude=own,
                    query_chunk=10**6, train_chunk=10**6)
    chunked = nearest(queries, data["x_train"][:300], 6, exclude=own,
                      query_chunk=query_chunk, train_chunk=train_chunk)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])
    want = reference_any(queries, data["x_train"][:300], 6, exclude=own)
    np.testing.assert_array_equal(chunked[0], want[0])
    np.testing.assert_array_equal(chunked[1], want[1])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 25), m=st.integers(0, 8), k=st.integers(1, 30),
       query_chunk=st.integers(1, 9), train_chunk=st.integers(1, 9),
       seed=st.integers(0, 2**32 - 1))
def test_nearest_is_brute_force_for_any_sizes_chunks_and_exclusions(n, m, k, query_chunk,
                                                                    train_chunk, seed):
    rng = np.random.default_rng(seed)
    levels = np.array([0, 1, 2, 255], np.uint8)
    train_x = random_images(rng, n, 2, levels)
    queries = random_images(rng, m, 2, levels)
    exclude = rng.integers(-1, max(n, 1), m)
    idx, dist = nearest(queries, train_x, k, exclude=exclude, query_chunk=query_chunk,
                        train_chunk=train_chunk)
    want = reference_any(queries, train_x, k, exclude=exclude)
    np.testing.assert_array_equal(idx, want[0])
    np.testing.assert_array_equal(dist, want[1])


def test_nearest_refuses_bad_k_chunks_pixels_and_exclude():
    u = np.zeros((2, 28, 28), dtype=np.uint8)
    for bad in ({"k": 0}, {"k": -1}, {"k": 1, "query_chunk": 0}, {"k": 1, "train_chunk": 0}):
        with pytest.raises(ValueError, match=">= 1"):
            nearest(u, u, **bad)
    with pytest.raises(ValueError, match="integers"):
        nearest(u.astype(np.float32), u, 1)
    with pytest.raises(ValueError, match="integers"):
        nearest(u, u / 255, 1)
    with pytest.raises(ValueError, match="0..255"):
        nearest(u.astype(np.int16) - 1, u, 1)
    with pytest.raises(ValueError, match="differ in size"):
        nearest(u, u[:, :27], 1)
    for shape in ((3,), (1,), (2, 1), ()):
        with pytest.raises(ValueError, match="exclude"):
            nearest(u, u, 1, exclude=np.zeros(shape, dtype=np.int64))
