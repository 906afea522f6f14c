"""Statistics across seeds, as Agarwal et al. (2021) recommend, through their library rliable.

* the interquartile mean (IQM): the mean of the middle 50% of the scores (``scipy.stats.trim_mean``
  with 25% cut at each end), robust to one lucky or one failed seed, less noisy than the median;
* 95% intervals by the percentile bootstrap over runs (rliable's stratified bootstrap, which with
  one task resamples the runs with replacement);
* the probability of improvement P(X > Y): the chance that a run of X scores above a run of Y,
  ties counting one half (the Mann-Whitney U statistic over all pairs of runs), with an interval
  from resampling the runs of X and of Y independently.

rliable draws its resamples from numpy's global generator; :func:`seeded` fixes it for the call
and puts the caller's state back, so that the same scores give the same intervals.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

#: Bootstrap resamples: the 2.5% and 97.5% percentiles settle to within a few percent.
DEFAULT_REPS = 2000
CONFIDENCE = 0.95


class Interval(NamedTuple):
    """A point estimate and its 95% interval."""

    point: float
    low: float
    high: float


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """numpy's global generator seeded with ``seed`` inside, restored after."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def iqm(scores: np.ndarray) -> float:
    """The interquartile mean of ``scores`` (any shape; all values together)."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(np.asarray(scores, dtype=float)))


def _bootstrap(
    scores: np.ndarray | list[np.ndarray], statistic: Callable[..., np.ndarray], reps: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """rliable's stratified bootstrap: (point estimates, (2, k) array of lower and upper bounds)."""
    from rliable import library

    with seeded(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arch warns about few observations; three seeds are few
        points, intervals = library.get_interval_estimates(
            {"x": scores}, statistic, reps=reps, confidence_interval_size=CONFIDENCE
        )
    return np.asarray(points["x"], dtype=float), np.asarray(intervals["x"], dtype=float)


def iqm_interval(scores: np.ndarray, reps: int = DEFAULT_REPS, seed: int = 0) -> Interval:
    """IQM of the runs' scores with its 95% percentile-bootstrap interval."""
    from rliable import metrics

    runs = np.asarray(scores, dtype=float).reshape(-1, 1)  # (runs, one task)
    points, bounds = _bootstrap(runs, lambda x: np.array([metrics.aggregate_iqm(x)]), reps, seed)
    return Interval(float(points[0]), float(bounds[0, 0]), float(bounds[1, 0]))


def mean_interval(scores: np.ndarray, reps: int = DEFAULT_REPS, seed: int = 0) -> Interval:
    """Mean of the runs' scores with its 95% percentile-bootstrap interval."""
    runs = np.asarray(scores, dtype=float).reshape(-1, 1)
    points, bounds = _bootstrap(runs, lambda x: np.array([x.mean()]), reps, seed)
    return Interval(float(points[0]), float(bounds[0, 0]), float(bounds[1, 0]))


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(a run of X scores above a run of Y), ties counting one half."""
    from rliable import metrics

    return float(metrics.probability_of_improvement(_runs(x), _runs(y)))


def improvement_interval(x: np.ndarray, y: np.ndarray, reps: int = DEFAULT_REPS, seed: int = 0) -> Interval:
    """P(X > Y) with its 95% interval (the runs of X and of Y resampled independently)."""
    points, bounds = _bootstrap([_runs(x), _runs(y)], _pairwise_improvement, reps, seed)
    return Interval(float(points[0]), float(bounds[0, 0]), float(bounds[1, 0]))


def _pairwise_improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """rliable's probability of improvement for one task, over all pairs at once: its own
    (``scipy.stats.mannwhitneyu`` per resample) costs a millisecond a resample."""
    difference = x[:, 0, None] - y[None, :, 0]
    return np.array([(difference > 0).mean() + 0.5 * (difference == 0).mean()])


def curve_band(
    curves: np.ndarray, reps: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean learning curve of the runs ``curves`` (runs, points) with a pointwise 95% band.

    Returns:
        ``(mean, low, high)``, each of shape (points,).
    """
    curves = np.asarray(curves, dtype=float)
    points, bounds = _bootstrap(curves, lambda c: c.mean(axis=0), reps, seed)
    return points, bounds[0], bounds[1]


def _runs(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores, dtype=float).reshape(-1, 1)
