"""Nearest training images of a given class, in pixel space: the evidence behind an error.

Distance: squared Euclidean (L2) distance between the raw 0..255 pixel values of two
28×28 images, sum((a - b)²) over the 784 pixels. It is computed as |a|² - 2a·b + |b|² with
one float64 matrix product per block; every term is an integer below 2⁵³, so the result is
exact (no rounding), whatever the blocking. Ties are broken by the lower training index.
The search is therefore deterministic, and chunking never changes the answer.

Memory is bounded by the block sizes: a block of `query_chunk` queries against
`train_chunk` training images needs a few query_chunk × train_chunk float64 arrays
(about 50 MB at the defaults), whatever the size of the data.
"""

from __future__ import annotations

import numpy as np

DISTANCE = "squared Euclidean (L2) distance of the raw 0..255 pixels"
QUERY_CHUNK = 1024
TRAIN_CHUNK = 2048
MAX_PIXEL_DISTANCE = 255 * 255  # per pixel; times the pixel count bounds every distance


def _flat(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    # An explicit width: reshape(0, -1) is ambiguous (no errors means no queries).
    return images.reshape(len(images), int(np.prod(images.shape[1:])))


def squared_distances(queries: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Exact squared L2 distances (int64), every query × every training image. Brute force:
    for tests and small inputs; `nearest_by_class` is the chunked, fast path."""
    q = _flat(queries).astype(np.int64)
    t = _flat(train).astype(np.int64)
    return ((q[:, None, :] - t[None, :, :]) ** 2).sum(axis=2)


def nearest_by_class(
    queries: np.ndarray,
    train_x: np.ndarray,
    train_y: np.ndarray,
    classes: np.ndarray,
    k: int,
    query_chunk: int = QUERY_CHUNK,
    train_chunk: int = TRAIN_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """For query i and slot j, the k training images of class classes[i, j] nearest query i.

    queries: (m, 28, 28) uint8; train_x: (n, 28, 28) uint8; train_y: (n,) labels;
    classes: (m, s) class wanted per query and slot (e.g. slot 0 = true, 1 = predicted).
    Returns (indices, distances), both (m, s, k) int64: training indices nearest first
    (ties: lower index first) and their exact squared L2 distances. When a class has fewer
    than k training images the missing places hold index -1 and distance -1.
    """
    if k < 1 or query_chunk < 1 or train_chunk < 1:
        raise ValueError("k, query_chunk and train_chunk must be >= 1")
    q_flat = _flat(queries)
    t_flat = _flat(train_x)
    train_y = np.asarray(train_y)
    classes = np.asarray(classes, dtype=np.int64)
    if classes.ndim == 1:
        classes = classes[:, None]
    m, slots = classes.shape
    if len(q_flat) != m:
        raise ValueError(f"{len(q_flat)} queries but {m} rows of classes")
    _check(q_flat, t_flat, train_y)
    n = len(t_flat)
    indices = np.full((m, slots, k), -1, dtype=np.int64)
    distances = np.full((m, slots, k), -1, dtype=np.int64)
    for c in np.unique(classes):
        members = np.flatnonzero(train_y == c)
        rows, cols = np.nonzero(classes == c)
        wanted = np.unique(rows)  # a query wanting c in two slots is searched once
        if len(members) == 0 or len(wanted) == 0:
            continue
        best = _search(q_flat[wanted], t_flat, members, n, k, query_chunk, train_chunk)
        found = min(k, len(members))
        keys = best[:, :found]
        where = np.searchsorted(wanted, rows)
        picked = keys[where].astype(np.int64)
        indices[rows, cols, :found] = picked % n
        distances[rows, cols, :found] = picked // n
    return indices, distances


def _check(q_flat: np.ndarray, t_flat: np.ndarray, train_y: np.ndarray) -> None:
    if q_flat.shape[1] != t_flat.shape[1] or len(t_flat) != len(train_y):
        raise ValueError("queries and training images differ in size, or labels in count")
    if not (np.issubdtype(q_flat.dtype, np.integer) and np.issubdtype(t_flat.dtype, np.integer)):
        raise ValueError("pixels must be integers in 0..255 (raw images, not normalized)")
    if max(int(q_flat.max(initial=0)), int(t_flat.max(initial=0))) > 255 or min(
        int(q_flat.min(initial=0)), int(t_flat.min(initial=0))
    ) < 0:
        raise ValueError("pixels must be integers in 0..255")
    n = len(t_flat)
    # key = distance * n + index: unique per training image, so ordering by key is ordering
    # by (distance, index). Exact in float64 while it stays below 2**53.
    if (q_flat.shape[1] * MAX_PIXEL_DISTANCE + 1) * max(n, 1) >= 2**53:
        raise ValueError("too many or too large images for exact float64 distances")


def nearest(queries: np.ndarray, train_x: np.ndarray, k: int, exclude=None,
            query_chunk: int = QUERY_CHUNK, train_chunk: int = TRAIN_CHUNK,
            ) -> tuple[np.ndarray, np.ndarray]:
    """For query i, its k nearest training images of any class: (indices, distances), both
    (m, k) int64, nearest first, ties by the lower index, exact as nearest_by_class.

    exclude: per query, one training index never to return (-1: none), e.g. the query
    itself when the queries are training images."""
    if k < 1 or query_chunk < 1 or train_chunk < 1:
        raise ValueError("k, query_chunk and train_chunk must be >= 1")
    q_flat, t_flat = _flat(queries), _flat(train_x)
    _check(q_flat, t_flat, np.zeros(len(t_flat)))
    n, m = len(t_flat), len(q_flat)
    skip = np.full(m, -1, dtype=np.int64) if exclude is None else np.asarray(exclude, np.int64)
    if skip.shape != (m,):
        raise ValueError(f"exclude: one index per query expected, got shape {skip.shape}")
    wanted = min(k + 1, n)
    keys = _search(q_flat, t_flat, np.arange(n), n, wanted, query_chunk, train_chunk)
    real = np.isfinite(keys)
    found = np.where(real, keys, 0).astype(np.int64)
    indices = np.where(real, found % n, -1)
    distances = np.where(real, found // n, -1)
    keep = real & (indices != skip[:, None])
    # The first k kept places of each row (the excluded one, if found, drops out).
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    indices = np.take_along_axis(np.where(keep, indices, -1), order, axis=1)
    distances = np.take_along_axis(np.where(keep, distances, -1), order, axis=1)
    if indices.shape[1] < k:  # fewer than k training images in all
        pad = np.full((m, k - indices.shape[1]), -1, dtype=np.int64)
        indices, distances = np.hstack([indices, pad]), np.hstack([distances, pad])
    return indices, distances


def _search(queries, t_flat, members, n, k, query_chunk, train_chunk) -> np.ndarray:
    """Sorted keys (distance * n + index) of the k nearest members, per query (float64)."""
    best = np.full((len(queries), k), np.inf)
    for t0 in range(0, len(members), train_chunk):
        block = members[t0 : t0 + train_chunk]
        t = t_flat[block].astype(np.float64)
        t_norm = np.einsum("ij,ij->i", t, t)
        for q0 in range(0, len(queries), query_chunk):
            q = queries[q0 : q0 + query_chunk].astype(np.float64)
            q_norm = np.einsum("ij,ij->i", q, q)
            key = q @ t.T
            key *= -2.0
            key += q_norm[:, None]
            key += t_norm[None, :]
            key *= n
            key += block[None, :]
            if key.shape[1] > k:
                part = np.argpartition(key, k - 1, axis=1)[:, :k]
                key = np.take_along_axis(key, part, axis=1)
            merged = np.concatenate([best[q0 : q0 + query_chunk], key], axis=1)
            merged.sort(axis=1)
            best[q0 : q0 + query_chunk] = merged[:, :k]
    return best
