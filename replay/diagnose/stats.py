"""The floor test and the sequential onset test (DESIGN §8.3, §8.4). Pure functions.

A component ``c`` (a per-token difference between two computations of the same
logprob, e.g. ``e_backend = lp_rollout - lp_ref``) is *at the floor* when nothing
in it is larger than the numerics of the body dtype can make it. The floor ``F`` is
measured per token: the reference computed in the body dtype against the reference
computed exactly (:mod:`replay.diagnose.reference`). Under the hypothesis that both
sides of ``c`` are correct computations in that dtype, each side's error is a draw of
the floor's size, so by the triangle inequality:

* **mean test**: ``E|c| <= KAPPA * E[F]`` with ``KAPPA = 2`` (where one side is the float32
  reference of a bf16 body, that side is near exact and 2 is a margin for another
  implementation's bf16 errors being larger than transformers'). Rejected when the
  observed ``mean|c| - KAPPA * mean(F)`` exceeds ``Z`` standard errors (of both means);
* **tail test**: a token with ``|c| > KAPPA * q(F)`` (``q`` the floor's
  :data:`TAIL_Q` quantile) needs one side's error above ``q``, which happens with
  probability at most ``1 - TAIL_Q`` per side: at most :data:`TAIL_RATE` of the tokens
  under the hypothesis (plus twice the floor's own rate of support flips: tokens that
  one dtype puts inside a truncated support and the other outside). Rejected when the
  count of such tokens is ``Z`` binomial standard deviations above that rate. A small
  cause on few tokens (the late step of an async update, stale KV after a boundary) fails this one.

``Z = 3.09`` is a one-sided test at 1e-3 for each; :data:`EPS` (2e-6, two float32
steps of a logprob near 16) keeps logprobs stored as float32 from failing a floor of
exactly zero. The floor is an absolute criterion, so the test can fail: a component
above it is something no choice of numerics explains.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

KAPPA = 2.0        # both sides carry one floor's error: |a - b| <= |a - x| + |b - x|
TAIL_Q = 0.99      # the floor's quantile of the tail test
TAIL_RATE = 0.02   # tokens over KAPPA * q(F) under the hypothesis: (1 - TAIL_Q) per side
Z = 3.09           # one-sided 1e-3
EPS = 2e-6         # float32 resolution of a stored logprob of magnitude <= 16
MIN_EXCEED = 3     # fewer exceedances than this never reject (a normal approximation needs counts)


@dataclass(frozen=True)
class Floor:
    """The measured floor: per-token samples of |body dtype - exact|."""

    mean: float
    sd: float
    q: float           # the TAIL_Q quantile
    flip_rate: float   # share of samples where the two dtypes disagree on the support
    n: int             # finite samples

    @classmethod
    def of(cls, samples: np.ndarray) -> "Floor":
        x = np.asarray(samples, np.float64).reshape(-1)
        x = x[~np.isnan(x)]
        flips = np.isinf(x)
        fin = x[~flips]
        if fin.size == 0:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        return cls(float(fin.mean()), float(fin.std(ddof=1)) if fin.size > 1 else 0.0,
                   float(np.quantile(fin, TAIL_Q)), float(flips.mean()), int(fin.size))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FloorTest:
    """Whether a component's tokens are at the floor, with the evidence."""

    n: int                 # tokens compared (both sides known)
    mean_abs: float        # mean |c| over the finite ones
    mean: float            # mean c (signed)
    bound: float           # KAPPA * mean floor: the mean test's bound
    z_mean: float
    tail_bound: float      # KAPPA * q(F): a token above it is an exceedance
    exceed: int            # exceedances (support disagreements included)
    outside: int           # tokens one side puts outside the support and the other inside
    tail_rate: float       # rate allowed under the hypothesis
    z_tail: float
    at_floor: bool | None  # None: nothing to compare

    def as_dict(self) -> dict:
        return asdict(self)


def floor_test(c: np.ndarray, floor: Floor) -> FloorTest:
    """Test per-token differences ``c`` (NaN: not compared; +-inf: one side outside the
    support) against ``floor``."""
    c = np.asarray(c, np.float64).reshape(-1)
    c = c[~np.isnan(c)]
    n = int(c.size)
    inf = np.isinf(c)
    fin = np.abs(c[~inf])
    if n == 0 or floor.n == 0:
        return FloorTest(n, math.nan, math.nan, math.nan, math.nan, math.nan, 0, int(inf.sum()),
                         TAIL_RATE, math.nan, None)
    mean_abs = float(fin.mean()) if fin.size else 0.0
    mean = float(c[~inf].mean()) if fin.size else 0.0
    bound = KAPPA * floor.mean + EPS
    se = math.sqrt((fin.var(ddof=1) / fin.size if fin.size > 1 else 0.0)
                   + KAPPA ** 2 * floor.sd ** 2 / max(floor.n, 1))
    z_mean = (mean_abs - bound) / se if se > 0 else (math.inf if mean_abs > bound else -math.inf)
    tail_bound = KAPPA * floor.q + EPS
    exceed = int((fin > tail_bound).sum() + inf.sum())
    rate = min(1.0, TAIL_RATE + 2 * floor.flip_rate)
    sd = math.sqrt(n * rate * (1 - rate))
    z_tail = (exceed - n * rate) / sd if sd > 0 else (math.inf if exceed > n * rate else -math.inf)
    reject = z_mean > Z or (z_tail > Z and exceed >= MIN_EXCEED)
    return FloorTest(n, mean_abs, mean, bound, _finite(z_mean), tail_bound, exceed, int(inf.sum()), rate,
                     _finite(z_tail), not reject)


def _finite(z: float) -> float:
    return float(max(min(z, 1e6), -1e6))


def cusum_onset(steps: list[int], z: list[float], *, k: float, h: float) -> tuple[int | None, list[float]]:
    """One-sided CUSUM over ``z``, ``S_t = max(0, S_{t-1} + z_t - k)``: an alarm when ``S_t > h``.
    Returns (the step where the excursion that raised the alarm began, or None; the CUSUM path)."""
    s, start, path, onset = 0.0, None, [], None
    for step, zt in zip(steps, z):
        prev = s
        s = max(0.0, s + zt - k)
        if prev == 0.0 and s > 0.0:
            start = step
        if s == 0.0:
            start = None
        path.append(s)
        if onset is None and s > h:
            onset = start if start is not None else step
    return onset, path
