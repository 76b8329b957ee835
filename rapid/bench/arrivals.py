"""Request arrival times for the serving benchmark (``vllm bench serve`` semantics).

Gaps between consecutive requests are i.i.d. gamma with ``shape = burstiness`` and
``scale = 1 / (rate * burstiness)``, so the mean gap is ``1 / rate`` whatever the burstiness:

* ``burstiness == 1``: exponential gaps, i.e. a Poisson process of intensity ``rate``;
* ``burstiness < 1``: burstier than Poisson (gap coefficient of variation ``1/sqrt(b) > 1``);
* ``burstiness > 1``: more regular; ``burstiness = inf``: constant gaps of ``1 / rate``;
* ``rate = inf``: every request arrives at time 0.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["arrival_times"]


def arrival_times(
    num: int,
    rate: float,
    burstiness: float = 1.0,
    seed: int | np.random.Generator = 0,
    *,
    normalize_total: bool = False,
) -> np.ndarray:
    """Arrival time of each of ``num`` requests, in seconds from the start of the run.

    Arrival ``i`` (0-based) is the sum of the first ``i + 1`` gaps, as in current vllm, where
    the first request also waits one gap: a renewal process started at time 0. The times are
    non-decreasing.

    Args:
        num: Number of requests (>= 0).
        rate: Mean request rate in requests/s (> 0); ``math.inf`` sends all at time 0.
        burstiness: Gamma shape of the gaps (> 0, may be ``math.inf``); 1 means Poisson.
        seed: Seed or ``numpy.random.Generator`` for the gaps.
        normalize_total: Rescale all times so that the last arrival is exactly
            ``num / rate``, as vllm does when no ramp-up is set (it removes the 1-2%
            seed-to-seed spread of the run length; the gaps are then no longer exactly
            i.i.d.). Off by default.

    Returns:
        A float64 array of shape ``(num,)``.
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise ValueError(f"num must be a non-negative int, got {num!r}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (or inf), got {burstiness}")

    if math.isinf(rate):
        return np.zeros(num, dtype=np.float64)
    if math.isinf(burstiness):
        gaps = np.full(num, 1.0 / rate, dtype=np.float64)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)
    times = np.cumsum(gaps, dtype=np.float64)
    if normalize_total and num > 0 and times[-1] > 0:
        times *= (num / rate) / times[-1]
    return times
