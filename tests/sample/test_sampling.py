"""Triplet sampling: semantics of each strategy, eligibility, weighting, determinism, speed."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from alignet_core.errors import ConfigError
from alignet_core.sample.strategies import STRATEGIES, sample_shard


def _n_distinct_groups(g3: np.ndarray) -> np.ndarray:
    """g3: (m, 3) group ids → (m,) number of distinct groups per row."""
    s = np.sort(g3, axis=1)
    return 1 + (s[:, 1] != s[:, 0]) + (s[:, 2] != s[:, 1])


@pytest.fixture(scope="module")
def groups() -> np.ndarray:
    rng = np.random.default_rng(1)
    g = rng.integers(0, 12, size=4000) * 7 + 3  # non-contiguous ids
    g[rng.random(4000) < 0.15] = -1  # ineligible rows
    return g


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_semantics_and_eligibility(strategy: str, groups: np.ndarray) -> None:
    t = sample_shard(strategy, groups, 30000, seed=5, shard_index=2)
    assert t.shape == (30000, 3) and t.dtype == np.int64
    assert (t >= 0).all() and (t < len(groups)).all()
    assert not ((t[:, 0] == t[:, 1]) | (t[:, 0] == t[:, 2]) | (t[:, 1] == t[:, 2])).any()
    g3 = groups[t]
    assert (g3 >= 0).all(), "an ineligible row was sampled"
    distinct = _n_distinct_groups(g3)
    expected = {"between_class": 3, "cluster": 3, "within_class": 1, "class_border": 2, "cluster_border": 2}[strategy]
    assert (distinct == expected).all()


@pytest.mark.parametrize("strategy", ["class_border", "cluster_border"])
def test_border_odd_position_is_shuffled(strategy: str, groups: np.ndarray) -> None:
    t = sample_shard(strategy, groups, 30000, seed=0, shard_index=0)
    g3 = groups[t]
    odd = np.where(g3[:, 1] == g3[:, 2], 0, np.where(g3[:, 0] == g3[:, 2], 1, 2))
    share = np.bincount(odd, minlength=3) / len(t)
    np.testing.assert_allclose(share, 1 / 3, atol=0.02)


def test_groups_weighted_by_size_and_small_groups_excluded() -> None:
    sizes = [2, 10, 100, 1000]
    groups = np.repeat(np.arange(4), sizes)
    m = 100_000
    within = groups[sample_shard("within_class", groups, m, 0, 0)][:, 0]
    frac = np.bincount(within, minlength=4) / m
    assert frac[0] == 0  # a group of 2 cannot hold a within triplet
    np.testing.assert_allclose(frac[1:], np.array(sizes[1:]) / sum(sizes[1:]), atol=0.01)

    # border: the pair's group ∝ size; the odd image uniform over the images outside it
    g3 = groups[sample_shard("class_border", groups, m, 0, 0)]
    s = np.sort(g3, axis=1)
    pair = s[:, 1]  # the middle of a sorted (a, a, b) / (a, b, b) is the pair's group
    np.testing.assert_allclose(np.bincount(pair, minlength=4) / m, np.array(sizes) / sum(sizes), atol=0.01)


def test_within_is_uniform_over_images() -> None:
    groups = np.repeat(np.arange(3), [5, 20, 75])
    t = sample_shard("within_class", groups, 200_000, 3, 1)
    counts = np.bincount(t.ravel(), minlength=len(groups))
    np.testing.assert_allclose(counts / counts.mean(), 1.0, atol=0.06)


def test_between_with_exactly_three_groups_takes_one_of_each() -> None:
    groups = np.array([0] * 50 + [1] * 3 + [2] * 1 + [-1] * 10)
    g3 = np.sort(groups[sample_shard("between_class", groups, 5000, 1, 0)], axis=1)
    assert (g3 == [0, 1, 2]).all()


@pytest.mark.parametrize(
    "strategy,groups",
    [
        ("between_class", np.array([0, 0, 1, 1, -1, -1, 2])[:6]),  # two eligible groups
        ("cluster", np.array([5] * 10)),
        ("within_class", np.array([0, 0, 1, 1, 2, 2, -1])),  # no group of three
        ("class_border", np.array([0, 0, 0, 0])),  # one group only
        ("cluster_border", np.array([0, 1, 2, 3])),  # no group of two
        ("between_class", np.array([-1, -1, -1])),  # nothing eligible
    ],
)
def test_impossible_requests_raise(strategy: str, groups: np.ndarray) -> None:
    with pytest.raises(ConfigError):
        sample_shard(strategy, groups, 10, 0, 0)


def test_bad_arguments_raise(groups: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="strateg"):
        sample_shard("random", groups, 10, 0, 0)
    with pytest.raises(ConfigError):
        sample_shard("cluster", groups, -1, 0, 0)
    assert sample_shard("cluster", groups, 0, 0, 0).shape == (0, 3)


def test_deterministic_per_seed_and_shard(groups: np.ndarray) -> None:
    a = sample_shard("cluster_border", groups, 1000, 7, 3)
    np.testing.assert_array_equal(a, sample_shard("cluster_border", groups, 1000, 7, 3))
    assert not np.array_equal(a, sample_shard("cluster_border", groups, 1000, 7, 4))
    assert not np.array_equal(a, sample_shard("cluster_border", groups, 1000, 8, 3))
    # the same groups under another strategy name of the same rule: another stream
    assert not np.array_equal(a, sample_shard("class_border", groups, 1000, 7, 3))


def test_independent_of_worker_count_and_order(groups: np.ndarray) -> None:
    shards = list(range(8))
    serial = {i: sample_shard("between_class", groups, 2000, 11, i) for i in shards}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {i: pool.submit(sample_shard, "between_class", groups, 2000, 11, i) for i in reversed(shards)}
        parallel = {i: f.result() for i, f in futures.items()}
    for i in shards:
        np.testing.assert_array_equal(serial[i], parallel[i])


def test_vectorized_speed() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 500, size=200_000)
    sample_shard("cluster_border", groups, 1000, 0, 0)  # warm-up
    for strategy in ("cluster_border", "between_class", "within_class"):
        t0 = time.perf_counter()
        out = sample_shard(strategy, groups, 1_000_000, 0, 1)
        elapsed = time.perf_counter() - t0
        assert out.shape == (1_000_000, 3)
        assert elapsed < 5.0, f"{strategy}: {elapsed:.2f}s for 1M triplets"
