"""Mismatch metrics between trainer and rollout logprobs (names follow PipelineRL and verl).

Per generated token, ``r = lp_trainer - lp_rollout`` and ``rho = exp(r)``:

==================== ============================================================
``mean_abs_log_ratio`` mean |r|
``k1``                 mean(-r)
``kl_new_old``         k3 estimator, mean(rho - 1 - r)
``clip_rate``          fraction of tokens with r outside [log(1-eps_low), log(1+eps_high)]
                       (GSPO, ``clip="sequence"``: fraction of sequences whose mean r is)
``ess``                normalised effective sample size (sum rho)^2 / (sum rho^2) / n
``chi2``               mean(rho^2) - 1
``prob_diff``          mean |exp(lp_trainer) - exp(lp_rollout)| (verl)
``n_tokens``           number of tokens the metrics cover
==================== ============================================================

``ess`` and ``chi2`` square rho, so one outlier token could overflow them: for these
two only, r is clamped to [-RHO_CLAMP, RHO_CLAMP] inside exp. ``kl_new_old`` uses the
unclamped r (it becomes inf only past r > 709). Everything is computed in float64.

:func:`token_metrics` works on numpy arrays; :func:`step_metrics_sql` is the same
computation in DuckDB SQL, per step, for the read path's ``step_metrics`` view.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from replay.errors import BadInput

RHO_CLAMP = 20.0  # |r| bound inside exp() for ess and chi2 (exp(40) ~ 2e17 stays finite)

METRIC_NAMES = ("mean_abs_log_ratio", "k1", "kl_new_old", "clip_rate", "ess", "chi2",
                "prob_diff", "n_tokens")

# names used by PipelineRL (and the k3 of the literature) -> ours
METRIC_ALIASES = {
    "clamp_log_ratio_new_old_indicator": "clip_rate",
    "mean_abs_log_ratio_new_old": "mean_abs_log_ratio",
    "kl_new_old": "kl_new_old",
    "k3": "kl_new_old",
}

# columns of the per-step relation that step_metrics_sql() returns, in order
STEP_METRIC_COLUMNS = ("step", "n_sequences", "n_tokens", "mean_abs_log_ratio", "k1",
                       "kl_new_old", "clip_rate", "ess", "chi2", "prob_diff", "entropy",
                       "reward", "lag")


def canonical_metric_name(name: str) -> str:
    """Our name for a metric given under ours or under an alias (PipelineRL's)."""
    if name in METRIC_NAMES or name in STEP_METRIC_COLUMNS:
        return name
    if name in METRIC_ALIASES:
        return METRIC_ALIASES[name]
    raise BadInput(f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)} and aliases "
                   f"{', '.join(METRIC_ALIASES)}", field="metric")


def clip_bounds(eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[float, float]:
    """(log(1-eps_low), log(1+eps_high)): the log-ratio band outside which a token clips."""
    if not (0.0 <= eps_low <= 1.0) or not (0.0 <= eps_high) or math.isnan(eps_high):
        raise BadInput(f"clip epsilons must satisfy 0 <= eps_low <= 1 and eps_high >= 0, got "
                       f"eps_low={eps_low}, eps_high={eps_high}", field="eps")
    lo = -math.inf if eps_low == 1.0 else math.log1p(-eps_low)
    return lo, math.log1p(eps_high)


def token_metrics(lp_trainer: Any, lp_rollout: Any, *, eps_low: float = 0.2,
                  eps_high: float = 0.2, seq_lengths: Any = None,
                  clip: str = "token") -> dict[str, float]:
    """Mismatch metrics over per-token logprobs (any array-likes of equal length).

    ``seq_lengths`` (token counts of consecutive sequences, summing to the number of
    tokens) is required for ``clip="sequence"``; sequences of length 0 are skipped.
    Empty input gives NaN metrics and ``n_tokens`` 0.
    """
    if clip not in ("token", "sequence"):
        raise BadInput(f"clip must be 'token' or 'sequence', got {clip!r}", field="clip")
    lo, hi = clip_bounds(eps_low, eps_high)
    lt = np.asarray(lp_trainer, dtype=np.float64).reshape(-1)
    lr = np.asarray(lp_rollout, dtype=np.float64).reshape(-1)
    if lt.shape != lr.shape:
        raise BadInput(f"lp_trainer has {lt.size} tokens but lp_rollout has {lr.size}",
                       field="lp_trainer")
    n = lt.size
    lengths = None
    if clip == "sequence":
        if seq_lengths is None:
            raise BadInput("clip='sequence' needs seq_lengths", field="seq_lengths")
        lengths = np.asarray(seq_lengths, dtype=np.int64).reshape(-1)
        if (lengths < 0).any() or int(lengths.sum()) != n:
            raise BadInput(f"seq_lengths must be >= 0 and sum to the {n} tokens, got sum "
                           f"{int(lengths.sum())}", field="seq_lengths")
    if n == 0:
        out = {k: math.nan for k in METRIC_NAMES}
        out["n_tokens"] = 0
        return out
    with np.errstate(over="ignore", invalid="ignore"):
        r = lt - lr
        rho = np.exp(r)
        rc = np.clip(r, -RHO_CLAMP, RHO_CLAMP)
        rho_c, rho2_c = np.exp(rc), np.exp(2.0 * rc)
        if lengths is None:
            clipped = float(np.mean((r < lo) | (r > hi)))
        else:
            keep = lengths > 0
            seq_id = np.repeat(np.arange(lengths.size), lengths)
            seq_mean = np.bincount(seq_id, weights=r, minlength=lengths.size)[keep] / lengths[keep]
            clipped = float(np.mean((seq_mean < lo) | (seq_mean > hi)))
        return {
            "mean_abs_log_ratio": float(np.mean(np.abs(r))),
            "k1": float(np.mean(-r)),
            "kl_new_old": float(np.mean(rho - 1.0 - r)),
            "clip_rate": clipped,
            "ess": float(np.sum(rho_c) ** 2 / np.sum(rho2_c) / n),
            "chi2": float(np.mean(rho2_c) - 1.0),
            "prob_diff": float(np.mean(np.abs(np.exp(lt) - np.exp(lr)))),
            "n_tokens": int(n),
        }


# --------------------------------------------------------------------------- SQL

_IDENT = re.compile(r'^(?:[A-Za-z_][A-Za-z0-9_]*|"[^"]+")(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|"[^"]+"))*$')


def _relation(name: str, what: str) -> str:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise BadInput(f"{what} relation name {name!r} is not a plain (optionally "
                       "schema-qualified) SQL identifier", field=what)
    return name


def _double(x: float) -> str:
    return f"CAST('{x!r}' AS DOUBLE)"


def step_metrics_sql(tokens: str = "tokens", rollouts: str = "rollouts",
                     trainer: str | None = "trainer", eps_low: float = 0.2,
                     eps_high: float = 0.2) -> str:
    """DuckDB SELECT giving one row per step with :data:`STEP_METRIC_COLUMNS`.

    ``tokens`` needs ``step, request_id, lp_rollout, lp_trainer, weight_version,
    trainer_version, entropy``; ``rollouts`` needs ``step, request_id, reward``;
    ``trainer`` (optional, None to leave it out) needs ``step`` and only adds its steps
    to the list. Metrics cover tokens the trainer scored (``lp_trainer`` not NULL) and
    use r recomputed in double precision from the two logprob columns; a step with no
    scored token keeps its row with NULL metrics, ``n_tokens`` 0 and its
    ``n_sequences`` (rollouts of the step) and ``reward`` (their mean). ``entropy`` is
    the mean trainer entropy, ``lag`` the mean of ``trainer_version - weight_version``,
    both over scored tokens. Token-level ``clip_rate``; exp clamped as in the module doc.
    """
    tok = _relation(tokens, "tokens")
    rol = _relation(rollouts, "rollouts")
    lo, hi = clip_bounds(eps_low, eps_high)
    c = _double(RHO_CLAMP)
    trainer_steps = ""
    if trainer is not None:
        trainer_steps = f"\n    UNION SELECT step FROM {_relation(trainer, 'trainer')}"
    return f"""WITH scored AS (
    SELECT step,
           CAST(lp_trainer AS DOUBLE) - CAST(lp_rollout AS DOUBLE) AS r,
           CAST(lp_trainer AS DOUBLE) AS lt,
           CAST(lp_rollout AS DOUBLE) AS lr,
           CAST(entropy AS DOUBLE) AS entropy,
           CAST(trainer_version AS DOUBLE) - CAST(weight_version AS DOUBLE) AS lag
    FROM {tok}
    WHERE lp_trainer IS NOT NULL AND lp_rollout IS NOT NULL
), per_token AS (
    SELECT step,
           count(*) AS n_tokens,
           avg(abs(r)) AS mean_abs_log_ratio,
           avg(-r) AS k1,
           avg(exp(r) - 1.0 - r) AS kl_new_old,
           avg(CASE WHEN r < {_double(lo)} OR r > {_double(hi)} THEN 1.0 ELSE 0.0 END)
               AS clip_rate,
           sum(exp(least(greatest(r, -{c}), {c}))) AS sum_rho,
           sum(exp(2.0 * least(greatest(r, -{c}), {c}))) AS sum_rho2,
           avg(abs(exp(lt) - exp(lr))) AS prob_diff,
           avg(entropy) AS entropy,
           avg(lag) AS lag
    FROM scored
    GROUP BY step
), per_rollout AS (
    SELECT step, count(*) AS n_sequences, avg(CAST(reward AS DOUBLE)) AS reward
    FROM {rol}
    GROUP BY step
), steps AS (
    SELECT step FROM {rol}
    UNION SELECT step FROM {tok}{trainer_steps}
)
SELECT s.step AS step,
       coalesce(p.n_sequences, 0) AS n_sequences,
       coalesce(t.n_tokens, 0) AS n_tokens,
       t.mean_abs_log_ratio,
       t.k1,
       t.kl_new_old,
       t.clip_rate,
       t.sum_rho * t.sum_rho / t.sum_rho2 / t.n_tokens AS ess,
       t.sum_rho2 / t.n_tokens - 1.0 AS chi2,
       t.prob_diff,
       t.entropy,
       p.reward,
       t.lag
FROM steps s
LEFT JOIN per_token t ON t.step = s.step
LEFT JOIN per_rollout p ON p.step = s.step
WHERE s.step IS NOT NULL
ORDER BY s.step"""
