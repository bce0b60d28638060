"""The toy task: continue an arithmetic digit pattern.

A prompt ``<instruction> add D : X`` asks for the next four terms of
``X, X+D, X+2D, ...`` modulo 10, then ``<eos>``::

    <instruction> add 3 : 4   →   7 0 3 6 <eos>

Every prompt starts with the same 16-token instruction, as RL prompts share a
system prompt: with prefix caching on, that block is computed once and reused by
every later request, which is what makes a stale prefix cache matter.

The reward is verifiable and dense: the fraction of the five target positions
(four digits and the end token) the completion gets right, so a tiny model shows
progress within a few dozen steps. There are 30 distinct prompts (D in 1..3,
X in 0..9); a step samples a few of them, each answered by a GRPO group.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from replay.models import DEFAULT_VOCAB, EOS_ID, SPECIAL_TOKENS

_VOCAB = list(SPECIAL_TOKENS) + list(DEFAULT_VOCAB)
_ID = {t: i for i, t in enumerate(_VOCAB)}
# One full prefix-cache block (16 tokens) shared by every prompt.
INSTRUCTION = ["<bos>", "input", ":", "count", "and", "add", ",", "output", "to", "answer",
               "sum", "or", "len", "max", "min", "."]
INSTRUCTION_IDS = [_ID[t] for t in INSTRUCTION]
DIGIT_IDS = [_ID[str(d)] for d in range(10)]
N_TERMS = 4


@dataclass(frozen=True)
class Problem:
    step_size: int     # D
    start: int         # X

    @property
    def prompt_ids(self) -> list[int]:
        return INSTRUCTION_IDS + [_ID["add"], DIGIT_IDS[self.step_size], _ID[":"], DIGIT_IDS[self.start]]

    @property
    def target_ids(self) -> list[int]:
        return [DIGIT_IDS[(self.start + (i + 1) * self.step_size) % 10] for i in range(N_TERMS)] + [EOS_ID]

    def reward(self, output_ids) -> float:
        target = self.target_ids
        out = list(output_ids)[: len(target)]
        return sum(int(a == b) for a, b in zip(out, target)) / len(target)


ALL_PROBLEMS = [Problem(d, x) for d in (1, 2, 3) for x in range(10)]


def sample_problems(rng: np.random.Generator, n: int) -> list[Problem]:
    """``n`` distinct problems drawn with ``rng`` (deterministic for a seed)."""
    idx = rng.choice(len(ALL_PROBLEMS), size=n, replace=False)
    return [ALL_PROBLEMS[i] for i in idx]


def sft_examples() -> tuple[list[list[int]], list[list[int]]]:
    """Every problem with its target, for the warm start."""
    return [p.prompt_ids for p in ALL_PROBLEMS], [p.target_ids for p in ALL_PROBLEMS]
