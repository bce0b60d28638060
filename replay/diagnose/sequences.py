"""One rollout with its recorded logprobs and its reference scores (:class:`RefSeq`), the unit
the decomposition, the backend search and the trainer account work on.

:mod:`replay.diagnose.reference` builds them from a recording.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from replay.diagnose.scoring import Dist


@dataclass
class RefSeq:
    """One rollout with its recorded logprobs and its reference scores (float64 arrays)."""

    step: int
    request_id: str
    group_id: str | None
    prompt_ids: list[int]
    output_ids: list[int]
    versions: np.ndarray                  # int64, the version each token was stamped with
    trainer_version: int | None           # the trainer's recorded version (None: not recorded)
    lp_rollout: np.ndarray
    trainer_row: np.ndarray | None        # the trainer's logprobs as recorded (any length)
    num_cached_tokens: int | None
    dist: Dist                            # the sampler's distribution
    lp_sampler: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lp_tempered: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lp_sampler_tr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lp_tempered_tr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    floor: np.ndarray | None = None       # |body dtype - exact| per token, for sampled sequences
    floor_trainer: np.ndarray | None = None  # the same in the trainer's dtype, where it differs

    @property
    def n(self) -> int:
        return len(self.output_ids)

    @property
    def lp_trainer(self) -> np.ndarray | None:
        """The trainer's logprobs aligned by position as the ``tokens`` view aligns them
        (its first ``n`` values; NaN where the row is shorter)."""
        if self.trainer_row is None:
            return None
        out = np.full(self.n, np.nan)
        k = min(self.n, len(self.trainer_row))
        out[:k] = self.trainer_row[:k]
        return out

    @property
    def tr_versions(self) -> np.ndarray:
        """The version the trainer scored each token with (its recorded one, else the token's)."""
        if self.trainer_version is None:
            return self.versions
        return np.full(self.n, self.trainer_version, np.int64)

    def star(self, semantics: str) -> tuple[np.ndarray, np.ndarray]:
        """The reference under the trainer's semantics at the token's and the trainer's version."""
        if semantics == "untruncated":
            return self.lp_tempered, self.lp_tempered_tr
        return self.lp_sampler, self.lp_sampler_tr
