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

def latest_scoring_sql(alias: str = "") -> str:
    """SQL sort key of a trainer row (of table ``alias``): of several scorings of one
    (step, request_id) the one with the largest key counts. That is the one made with the
    newest weights (``weight_version``; unknown counts as oldest), then the lowest rank,
    then that rank's latest row: ``time_ns`` only orders rows of one rank (one clock), so
    clock skew between ranks never decides. :func:`latest_scoring_key` is the same rule."""
    a = f"{alias}." if alias else ""
    return (f"[CAST({a}weight_version IS NOT NULL AS BIGINT), coalesce({a}weight_version, 0), "
            f"-CAST({a}rank AS BIGINT), {a}time_ns]")


def latest_scoring_key(weight_version: int | None, rank: int, time_ns: int) -> tuple:
    """:func:`latest_scoring_sql` in Python: the sort key of one trainer row."""
    return (int(weight_version is not None), weight_version or 0, -rank, time_ns)


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
    steps = f"SELECT step FROM {rol}\n    UNION SELECT step FROM {tok}"
    if trainer is not None:
        steps += f"\n    UNION SELECT step FROM {_relation(trainer, 'trainer')}"
    source = f"""SELECT step, lp_trainer AS lt, lp_rollout AS lr, entropy AS ent,
           weight_version AS tv, trainer_version
    FROM {tok}"""
    return _per_step_sql(source, rol, steps, eps_low, eps_high)


def step_metrics_lists_sql(rollouts: str = "rollouts", trainer: str = "trainer",
                           eps_low: float = 0.2, eps_high: float = 0.2) -> str:
    """The same relation as :func:`step_metrics_sql` over the ``tokens`` view, computed
    straight from the recording's ``rollouts`` and ``trainer`` tables.

    The ``tokens`` view indexes every list once per position; here each rollout is
    joined once with the trainer's latest scoring of it (:func:`latest_scoring_sql`,
    found on the key columns alone) and the lists are unnested side by side, cut to the
    rollout's ``output_ids`` length where a list is longer. The join holds the
    rollouts' side in memory, so that side keeps only its logprobs: when a rollout's
    versions cover exactly the tokens scored (lists as long as ``output_ids``, no
    NULLs, every scoring of the key at least as long without NULLs) its
    ``token_versions`` travel as one sum, and the lag of the sequence is computed
    from it (integers: the same value as token by token).
    """
    rol = _relation(rollouts, "rollouts")
    tr = _relation(trainer, "trainer")
    source = f"""SELECT step, trainer_version,
           unnest(CASE WHEN len(lr) <= n THEN lr ELSE lr[:n] END) AS lr,
           unnest(CASE WHEN len(lt) <= n THEN lt ELSE lt[:n] END) AS lt,
           unnest(CASE WHEN len(ent) <= n THEN ent ELSE ent[:n] END) AS ent,
           unnest(CASE WHEN len(tv) <= n THEN tv ELSE tv[:n] END) AS tv,
           unnest(CASE WHEN tv_sum IS NOT NULL AND trainer_version IS NOT NULL
                       THEN [n * CAST(trainer_version AS DOUBLE) - tv_sum] END) AS lag_sum,
           unnest(CASE WHEN tv_sum IS NOT NULL AND trainer_version IS NOT NULL THEN [n] END) AS lag_n
    FROM (
        SELECT r.step, r.n, r.lr, r.tv, r.tv_sum, t.logprobs AS lt, t.ent,
               t.weight_version AS trainer_version
        FROM (
            SELECT step, request_id, n, lr,
                   CASE WHEN whole THEN NULL ELSE tv END AS tv,
                   CASE WHEN whole THEN CAST(list_sum(tv) AS DOUBLE) END AS tv_sum
            FROM (
                SELECT r.step, r.request_id, len(r.output_ids) AS n, r.logprobs AS lr,
                       r.token_versions AS tv,
                       coalesce(len(r.output_ids) > 0 AND len(r.logprobs) = len(r.output_ids)
                                AND list_count(r.logprobs) = len(r.logprobs)
                                AND len(r.token_versions) = len(r.output_ids)
                                AND list_count(r.token_versions) = len(r.token_versions)
                                AND l.shortest >= len(r.output_ids) AND l.clean, FALSE) AS whole
                FROM {rol} r
                LEFT JOIN latest l ON r.step = l.step AND r.request_id = l.request_id
            )
        ) r
        JOIN (
            SELECT t.step, t.request_id, t.weight_version, t.logprobs, t.entropy AS ent
            FROM {tr} t
            JOIN latest l
            ON t.step = l.step AND t.request_id = l.request_id AND {latest_scoring_sql("t")} = l.key
        ) t ON r.step = t.step AND r.request_id = t.request_id
    )"""
    latest = f"""SELECT step, request_id, max({latest_scoring_sql()}) AS key,
           min(len(logprobs)) AS shortest,
           bool_and(list_count(logprobs) = len(logprobs)) AS clean
    FROM {tr} GROUP BY step, request_id"""
    steps = f"SELECT step FROM {rol}\n    UNION SELECT step FROM {tr}"
    lag = ("(coalesce(sum(lag), 0.0) + coalesce(sum(lag_sum), 0.0)) / "
           "nullif(count(lag) + coalesce(sum(lag_n), 0), 0)")
    return _per_step_sql(source, rol, steps, eps_low, eps_high, lag,
                         "lag_sum, lag_n",
                         f"latest AS (\n    {latest}\n), ")


def _per_step_sql(source: str, rol: str, steps: str, eps_low: float, eps_high: float,
                  lag: str = "avg(lag)", extra: str = "NULL AS lag_sum, NULL AS lag_n",
                  ctes: str = "") -> str:
    """The per-step aggregation shared by both forms: ``source`` yields one row per token
    with ``step, lt, lr, ent, tv, trainer_version`` (NULL logprobs: not scored);
    ``lag`` aggregates the step's mean lag from the per-token column and whatever
    ``extra`` adds (per-sequence sums riding on a scored token); ``ctes``
    are more common table expressions for ``source`` (``name AS (...), ``)."""
    lo, hi = clip_bounds(eps_low, eps_high)
    c = _double(RHO_CLAMP)
    return f"""WITH {ctes}scored AS (
    SELECT step,
           CAST(lt AS DOUBLE) - CAST(lr AS DOUBLE) AS r,
           CAST(lt AS DOUBLE) AS lt,
           CAST(lr AS DOUBLE) AS lr,
           CAST(ent AS DOUBLE) AS entropy,
           CAST(trainer_version AS DOUBLE) - CAST(tv AS DOUBLE) AS lag,
           {extra}
    FROM ({source})
    WHERE lt IS NOT NULL AND lr IS NOT NULL
), terms AS (
    SELECT step, r, entropy, lag, lag_sum, lag_n, exp(r) AS rho,
           CASE WHEN r > {c} THEN exp({c}) WHEN r < -{c} THEN exp(-{c}) ELSE exp(r) END AS rho_c,
           abs(exp(lt) - exp(lr)) AS prob_diff
    FROM scored
), per_token AS (
    SELECT step,
           count(*) AS n_tokens,
           avg(abs(r)) AS mean_abs_log_ratio,
           sum(r) AS sum_r,
           avg(rho - 1.0 - r) AS kl_new_old,
           count_if(r < {_double(lo)} OR r > {_double(hi)}) AS n_clipped,
           sum(rho_c) AS sum_rho,
           sum(rho_c * rho_c) AS sum_rho2,
           avg(prob_diff) AS prob_diff,
           avg(entropy) AS entropy,
           {lag} AS lag
    FROM terms
    GROUP BY step
), per_rollout AS (
    SELECT step, count(*) AS n_sequences, avg(CAST(reward AS DOUBLE)) AS reward
    FROM {rol}
    GROUP BY step
), steps AS (
    {steps}
)
SELECT s.step AS step,
       coalesce(p.n_sequences, 0) AS n_sequences,
       coalesce(t.n_tokens, 0) AS n_tokens,
       t.mean_abs_log_ratio,
       -t.sum_r / t.n_tokens AS k1,
       t.kl_new_old,
       t.n_clipped / t.n_tokens AS clip_rate,
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
