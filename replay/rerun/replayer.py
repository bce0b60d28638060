"""Event-driven re-execution of recorded steps (DESIGN §4, §6).

For a recorded step the replayer rebuilds, from the recording alone, what the engine
went through: the weights of every version the step used (from the weight store),
the requests in submission order with their sampling parameters and seeds, the
weight updates with their mode and decode-step position (``weights_update_start``
events), and the prefix cache the step met. Then it drives an engine through them
under a chosen :class:`~replay.fixes.EngineConfig`:

``score``
    teacher-forced on the recorded tokens *through the generation path*: the engine
    emits the recorded tokens instead of sampling, so updates, async lag
    and the prefix cache act as they would have. Each token's replayed logprob sits
    beside the recorded rollout logprob and the trainer's logprob. Engines that cannot
    force tokens (vLLM) score each token with the weights of the version that produced
    it (``score()`` per version): no in-flight effects, documented in the result.
``regenerate``
    the same seeds, sampling freely: the first position where the replayed token
    differs from the recorded one.

The prefix cache at a step's start is rebuilt by replaying, under the same config,
every earlier step's generation (forced to its recorded tokens) in order, as the
run did. An engine is kept per config and moves forward through the steps, so a
range of steps in order pays for that history once. Under a config without prefix
caching nothing links one step to the next, and a range batches consecutive steps
into shared engine calls (each step from its own serving version, with its own
updates).

Results go back into the recording as rows of the ``replays`` table, keyed by the
engine config id, so SQL sees replayed logprobs beside recorded ones.
"""
from __future__ import annotations

import contextlib
import json
import uuid
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from replay.rerun.plans import RecordedRequest, StepPlan, step_ranges, _steps_with_rollouts, plan_step
from replay.errors import BadInput, RecordingError, ReplayError
from replay.fixes import EngineConfig
from replay.store.manifest import AUX_RANKS
from replay.metrics import token_metrics

__all__ = ["REPLAY_RANK", "RecordedRequest", "ReplayResult", "ReplayedSequence", "Replayer", "StepPlan", "plan_step"]

REPLAY_RANK = AUX_RANKS  # replays are written by their own writer rank, apart from the run's ranks


@dataclass
class ReplayedSequence:
    """One request of a replayed step: what was recorded, what the trainer scored, what the replay gave."""

    request_id: str
    recorded: Any                         # the recorded logprobs (float32 array)
    trainer: Any                          # the trainer's logprobs, None when it did not score it
    replayed: np.ndarray                  # the replay's logprobs (float32)
    versions: list[int] | None            # the weight version of each replayed token
    output_ids: list[int]                 # the tokens replayed (recorded, or regenerated)
    first_diff: int | None                # first position where the tokens differ from the recording
    recorded_versions: Any                # the recorded version of each token
    num_cached_tokens: int | None         # prefix-cache hits of the replay
    recorded_cached: int | None           # prefix-cache hits the recording saw


@dataclass
class ReplayResult:
    """A replayed step: per request, recorded, trainer and replayed logprobs."""

    step: int
    config: EngineConfig
    engine: str
    mode: str
    replay_id: str
    rows: list[ReplayedSequence]          # one per request, in the recorded order
    note: str = ""                        # how the replay was made, where it differs from the recording's path
    effective: dict = dataclasses.field(default_factory=dict)  # what the engine really ran with (vLLM: block size, ...)
    cache_compared: bool = True           # False: scored without the generation path (no prefix-cache hits to compare)

    def _cat(self, key: str) -> np.ndarray:
        parts = [np.asarray(getattr(r, key), np.float64) for r in self.rows if getattr(r, key) is not None]
        return np.concatenate(parts) if parts else np.zeros(0)

    def summary(self) -> dict:
        """Fidelity (replayed vs recorded) and the mismatch metrics of DESIGN §5.

        A forced token can lie outside the replayed config's sampling support (e.g. outside
        the top-p nucleus under processed logprobs): its replayed logprob is -inf. Such
        tokens are counted as ``outside_support`` and left out of the replayed metrics (the
        recorded metrics cover every scored token, so they do not depend on the config).
        """
        rec, rep = self._cat("recorded"), self._cat("replayed")
        out: dict[str, Any] = {"step": self.step, "config_id": self.config.id, "engine": self.engine,
                               "mode": self.mode, "n_sequences": len(self.rows)}
        if self.effective:
            out["engine_effective"] = self.effective
        pairs = [(int(r.recorded_cached), int(r.num_cached_tokens)) for r in self.rows
                 if r.recorded_cached is not None and r.num_cached_tokens is not None]
        if self.cache_compared and pairs:   # the KV the recording saw vs the KV the replay had
            out["prefix_cache"] = {"requests": len(pairs),
                                   "requests_differ": sum(a != b for a, b in pairs),
                                   "recorded_tokens": sum(a for a, _ in pairs),
                                   "replayed_tokens": sum(b for _, b in pairs)}
        if self.mode == "score" and len(rep) == len(rec) and len(rec):
            same = rep == rec
            d = np.where(same, 0.0, np.abs(rep - rec))
            finite = np.isfinite(d)
            out["fidelity"] = {"max_abs_diff": float(d.max()) if finite.all() else float("inf"),
                               "mean_abs_diff": float(d[finite].mean()) if finite.any() else float("nan"),
                               "exact": bool(same.all()), "n_tokens": int(len(d)),
                               "outside_support": int((~np.isfinite(rep)).sum())}
        if self.mode == "regenerate":
            diffs = [r.first_diff for r in self.rows]
            out["fidelity"] = {"identical_sequences": sum(d is None for d in diffs),
                               "first_diff": min((d for d in diffs if d is not None), default=None)}
        trainer_rows = [r for r in self.rows if r.trainer is not None and len(r.trainer) == len(r.recorded)]
        if trainer_rows and self.mode == "score":
            tr = np.concatenate([np.asarray(r.trainer, np.float64) for r in trainer_rows])
            recd = np.concatenate([np.asarray(r.recorded, np.float64) for r in trainer_rows])
            repd = np.concatenate([np.asarray(r.replayed, np.float64) for r in trainer_rows])
            ok = np.isfinite(tr) & np.isfinite(recd)   # the recording's own metrics: whatever the config
            inside = ok & np.isfinite(repd)
            out["recorded"] = {**token_metrics(tr[ok], recd[ok]), "n_tokens": int(ok.sum())}
            out["replayed"] = {**token_metrics(tr[inside], repd[inside]), "n_tokens": int(inside.sum()),
                               "outside_support": int((ok & ~np.isfinite(repd)).sum())}
        return out


class Replayer:
    """Replays steps of one recording; keeps one engine per config."""

    def __init__(self, path: str | Path, *, engine: str = "reference", device: str = "cpu",
                 python: str | None = None, model_path: str | Path | None = None, weights_from: str | Path | None = None):
        from replay.models import check_device
        from replay.read.recording import open_recording

        if engine == "reference":  # a vLLM engine picks its own device (its platform)
            check_device(device)
        self.path = Path(path)
        self.kind = engine
        self.device = device
        self.python = python
        self.rec = open_recording(self.path, weights_from=weights_from)
        try:
            self.model_path = Path(model_path) if model_path else self._model_path()
        except BaseException:
            self.rec.close()
            raise
        self._engines: dict[str, Any] = {}
        self._position: dict[str, int] = {}     # config id -> last step whose generation the engine has seen
        self._weights: dict[int, dict] = {}
        self.engine_calls = 0                   # generate() / generate_groups() calls made, all configs
        self.warnings: list[str] = []           # what the replay assumed that the recording did not say

    def _model_path(self) -> Path:
        from replay.models import recording_model

        return recording_model(self.path, self.rec.run_config())

    def recorded_settings(self) -> dict:
        """The recorded engine's settings (block size, max_model_len, batch limits, ...: what
        ``replay.integrations.vllm.describe_llm`` read), which a vLLM replay takes as they were."""
        settings = (self.rec.run_config().get("engine") or {}).get("settings")
        return dict(settings) if isinstance(settings, dict) else {}

    def recorded_config(self) -> EngineConfig:
        """The engine config the run recorded. Fields it lacks take the V1 defaults, and are
        named in :attr:`warnings` (``replay check`` names them too)."""
        cfg = (self.rec.run_config().get("engine") or {}).get("config")
        if not cfg:
            raise RecordingError(f"{self.path}: the run config holds no engine config (run_config['engine']"
                                 "['config']); `replay check` says how to record it", "cannot replay")
        defaulted = sorted({f.name for f in dataclasses.fields(EngineConfig)} - set(cfg))
        note = (f"the recorded engine config lacks {', '.join(defaulted)}: replayed with the V1 "
                "defaults for them")
        if defaulted and note not in self.warnings:
            self.warnings.append(note)
        return EngineConfig.from_dict(cfg)

    def steps(self) -> list[int]:
        return _steps_with_rollouts(self.rec)

    # ------------------------------------------------------------------ engines
    def _state(self, version: int) -> dict:
        if version not in self._weights:
            self._weights[version] = self.rec.load_weights(version)
        return self._weights[version]

    def _engine(self, config: EngineConfig):
        from replay.engines.factory import make_engine

        eng = self._engines.get(config.id)
        if eng is None:
            eng = make_engine(self.kind, self.model_path, config, device=self.device, python=self.python,
                              settings=self.recorded_settings())
            self._engines[config.id] = eng
            self._position[config.id] = -1
        return eng

    def _load(self, eng, versions: Sequence[int]) -> None:
        """Make every version in ``versions`` known to ``eng`` (without serving it)."""
        loaded = set(eng.versions)
        for v in sorted(set(versions) - loaded):
            eng.load_weights(v, self._state(v), activate=False)

    def _serve(self, eng, versions: Sequence[int], serving: int) -> None:
        self._load(eng, versions)
        eng.activate(serving)

    def _drive(self, eng, plan: StepPlan, *, forced: bool, num_topk: int = 0):
        self._serve(eng, plan.versions, plan.serving)
        self.engine_calls += 1
        return eng.generate(self._gen_requests(plan, forced, num_topk), plan.updates)

    @staticmethod
    def _gen_requests(plan: StepPlan, forced: bool, num_topk: int = 0) -> list:
        from replay.engines.base import GenRequest

        return [GenRequest(request_id=r.request_id, prompt_ids=r.prompt_ids,
                           max_tokens=max(1, len(r.output_ids)), temperature=r.temperature, top_p=r.top_p,
                           top_k=r.top_k, seed=r.seed, num_topk=num_topk, arrival_step=r.arrival_step,
                           forced_output_ids=r.output_ids if forced else None) for r in plan.requests]

    def _catch_up(self, eng, config: EngineConfig, step: int, progress: Callable | None) -> None:
        """Bring the engine's prefix cache to the start of ``step`` under ``config``."""
        if not config.enable_prefix_caching:
            return
        pos = self._position[config.id]
        if pos >= step:  # went back in time: rebuild from the start
            eng.reset_prefix_cache()
            pos = -1
        earlier = [s for s in self.steps() if pos < s < step]
        for s in earlier:
            self._drive(eng, plan_step(self.rec, s), forced=True)
            if progress:
                progress(f"rebuilding the prefix cache: step {s}")
        self._position[config.id] = step - 1

    # ------------------------------------------------------------------ replay
    def replay(self, step: int, config: EngineConfig | None = None, *, mode: str = "score",
               write: bool = True, progress: Callable[[str], None] | None = None,
               allow_incomplete: bool = False) -> ReplayResult:
        """Replay ``step`` under ``config`` (default: the recorded config)."""
        _check_mode(mode)
        config = config or self.recorded_config()
        plan = self._plan(step, allow_incomplete)
        eng = self._engine(config)
        forced_ok = eng.supports_forced_output
        self._catch_up(eng, config, step, progress)
        note = ""
        if mode == "regenerate":
            results = self._drive(eng, plan, forced=False)
        elif forced_ok:
            results = self._drive(eng, plan, forced=True)
        else:
            results = self._score_by_version(eng, plan)
            note = ("scored per token version with score(): this engine cannot force tokens through its "
                    "generation path, so in-flight effects (an update mid-sequence, async lag, stale prefix cache) "
                    "are not replayed")
        if progress:
            progress(f"step {step} replayed")
        self._position[config.id] = step
        result = self._result(plan, results, config, mode, note)
        result.effective = dict(eng.effective or {})
        result.cache_compared = not note   # the generation path ran: its prefix-cache hits are real
        if write:
            self._write(result)
        return result

    def _plan(self, step: int, allow_incomplete: bool) -> StepPlan:
        plan = plan_step(self.rec, step)
        self.warnings += [n for n in plan.notes if n not in self.warnings]
        if not plan.complete and not allow_incomplete:
            complete = self.complete_steps()
            if not plan.missing and not complete:   # no step boundaries at all: not a crash
                raise RecordingError(
                    f"{self.path} records no step boundaries (no step_end event), so no step is known "
                    "to be whole; record them with `with rec.step(k):` (or rec.event('step_end', step=k)), "
                    "or replay anyway with allow_incomplete=True; `replay check` lists what else is missing",
                    "incomplete step")
            what = (f"{len(plan.missing)} submitted request(s) have no rollout" if plan.missing
                    else "it has no step_end event")
            raise RecordingError(f"step {step} is incomplete in {self.path} ({what}): its writer stopped "
                                 f"or never marked its end; complete steps: {step_ranges(complete) or 'none'}",
                                 "incomplete step")
        return plan

    def _result(self, plan: StepPlan, results, config: EngineConfig, mode: str, note: str = "") -> ReplayResult:
        by_id = {r.request_id: r for r in results}
        rows: list[ReplayedSequence] = []
        for r in plan.requests:
            res = by_id[r.request_id]
            out = list(res.output_ids) if mode == "regenerate" else list(r.output_ids)
            first = next((i for i, (a, b) in enumerate(zip(out, r.output_ids)) if a != b), None)
            if first is None and len(out) != len(r.output_ids):
                first = min(len(out), len(r.output_ids))
            rows.append(ReplayedSequence(
                request_id=r.request_id, recorded=r.logprobs, trainer=r.trainer_logprobs,
                replayed=np.asarray(res.logprobs, np.float32),
                versions=list(res.token_versions) if res.token_versions else None,
                output_ids=out, first_diff=first, recorded_versions=r.token_versions,
                num_cached_tokens=res.num_cached_tokens, recorded_cached=r.num_cached_tokens))
        return ReplayResult(step=plan.step, config=config, engine=self.kind, mode=mode,
                            replay_id=uuid.uuid4().hex[:12], rows=rows, note=note)

    def _score_by_version(self, eng, plan: StepPlan):
        from replay.engines.base import GenResult, ScoreRequest

        lps = {r.request_id: np.zeros(len(r.output_ids), np.float32) for r in plan.requests}
        for v in sorted({v for r in plan.requests for v in r.token_versions} or {plan.serving}):
            self._serve(eng, plan.versions, v)
            reqs = [ScoreRequest(request_id=r.request_id, prompt_ids=r.prompt_ids, output_ids=r.output_ids,
                                 temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
                    for r in plan.requests if v in r.token_versions]
            for res in eng.score(reqs):
                req = next(r for r in plan.requests if r.request_id == res.request_id)
                mask = np.asarray(req.token_versions) == v
                lps[res.request_id][mask] = np.asarray(res.logprobs, np.float32)[mask]
        return [GenResult(request_id=r.request_id, output_ids=r.output_ids, logprobs=list(lps[r.request_id]),
                          token_versions=r.token_versions, finish_reason="length") for r in plan.requests]

    def complete_steps(self) -> list[int]:
        """Steps with rollouts whose ``step_end`` is recorded (replayable without ``allow_incomplete``)."""
        ended = {s for (s,) in self.rec.query("SELECT DISTINCT step FROM events WHERE kind = 'step_end'").fetchall()}
        return [s for s in self.steps() if s in ended]

    def replay_range(self, steps: Sequence[int], config: EngineConfig | None = None, *, mode: str = "score",
                     jobs: int = 1, batch: int = 256, write: bool = True,
                     progress: Callable[[str], None] | None = None,
                     allow_incomplete: bool = False) -> list[ReplayResult]:
        """Replay several steps under one config.

        In order, on one engine per config (the prefix cache moves forward with the steps
        instead of being rebuilt for each). Where no prefix cache links one step to the
        next (the config has prefix caching off), consecutive steps are batched: up to
        ``batch`` requests of several steps go to the engine in one call, each step with
        its own serving version and update schedule (:func:`~replay.engines.base.generate_groups`);
        ``batch=1`` replays one step per call. With ``jobs > 1`` the steps are cut into
        contiguous chunks replayed in parallel worker processes, each with its own engine
        (a chunk under prefix caching first rebuilds the cache up to its first step);
        results are written here, in step order, by one writer.
        """
        _check_mode(mode)
        if batch < 1:
            raise BadInput(f"batch must be >= 1 request, not {batch}", field="batch")
        config = config or self.recorded_config()
        steps = sorted(set(steps))
        if jobs <= 1 or len(steps) < 2:
            results: list[ReplayResult] = []

            def replayed(first: int) -> None:
                if progress:
                    last = results[-1].step
                    what = f"step {first}" if first == last else f"steps {first}-{last}"
                    progress(f"{what} replayed ({len(results)}/{len(steps)})")

            if self._one_step_per_call(config, mode, batch):
                for s in steps:
                    results.append(self.replay(s, config, mode=mode, write=False, allow_incomplete=allow_incomplete))
                    replayed(s)
            else:
                for plans in self._calls(steps, batch, allow_incomplete):
                    results += self._replay_batch(plans, config, mode)
                    replayed(plans[0].step)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            n = min(jobs, len(steps))
            chunks = [steps[i * len(steps) // n:(i + 1) * len(steps) // n] for i in range(n)]
            args = dict(path=str(self.path), kind=self.kind, device=self.device, python=self.python,
                        model_path=str(self.model_path), config=config.to_dict(), mode=mode, batch=batch,
                        allow_incomplete=allow_incomplete, weights_from=self.rec.weights_from)
            results = []
            with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as pool:
                for done, chunk in enumerate(pool.map(_replay_chunk, [dict(args, steps=c) for c in chunks])):
                    results += chunk
                    if progress:
                        progress(f"chunk {done + 1}/{n} replayed (steps {chunks[done][0]}-{chunks[done][-1]})")
        if write:
            self._write(*results)
        return results

    def _one_step_per_call(self, config: EngineConfig, mode: str, batch: int) -> bool:
        """Whether each step needs its own engine call: the prefix cache links a step to the
        next, or the engine cannot force recorded tokens through a batched generation."""
        return (batch == 1 or config.enable_prefix_caching
                or (mode == "score" and not self._engine(config).supports_forced_output))

    def _calls(self, steps: list[int], batch: int, allow_incomplete: bool) -> Iterator[list[StepPlan]]:
        """Consecutive steps cut into engine calls of at most ``batch`` requests (a larger step alone)."""
        chunk: list[StepPlan] = []
        for s in steps:
            plan = self._plan(s, allow_incomplete)
            if chunk and sum(len(p.requests) for p in chunk) + len(plan.requests) > batch:
                yield chunk
                chunk = []
            chunk.append(plan)
        if chunk:
            yield chunk

    def _replay_batch(self, plans: list[StepPlan], config: EngineConfig, mode: str) -> list[ReplayResult]:
        """Several steps in one engine call, each from its own serving version (no prefix cache)."""
        from replay.engines.base import GenGroup, generate_groups

        eng = self._engine(config)
        self._load(eng, [v for p in plans for v in p.versions])
        groups = [GenGroup(self._gen_requests(p, forced=mode == "score"), list(p.updates), p.serving)
                  for p in plans]
        self.engine_calls += 1
        outs = generate_groups(eng, groups)
        self._position[config.id] = plans[-1].step
        return [self._result(p, out, config, mode) for p, out in zip(plans, outs)]

    def _write(self, *results: ReplayResult) -> None:
        from replay.record.recorder import Recorder

        with _interrupt_after(), Recorder(self.path, rank=REPLAY_RANK, mode="append") as w:
            for result in results:
                for row in result.rows:
                        w.replay(step=result.step, request_id=row.request_id, engine_config=result.config.id,
                             config=json.dumps(result.config.to_dict(), sort_keys=True), engine=result.engine,
                             mode=result.mode, replay_id=result.replay_id, logprobs=row.replayed,
                             output_ids=row.output_ids, first_diff=row.first_diff)
        self.rec.refresh()

    def close(self) -> None:
        for eng in self._engines.values():
            try:
                eng.close()
            except ReplayError:
                pass
        self._engines.clear()
        self.rec.close()

    def __enter__(self) -> "Replayer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_mode(mode: str) -> None:
    if mode not in ("score", "regenerate"):
        raise BadInput(f"mode must be score or regenerate, not {mode!r}", field="mode")


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise it: replays are written whole or not at all."""
    import signal
    import threading

    from replay.signals import holdable

    if threading.current_thread() is not threading.main_thread() or not holdable(signal.getsignal(signal.SIGINT)):
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _replay_chunk(args: dict) -> list[ReplayResult]:
    """One worker's share of :meth:`Replayer.replay_range` (runs in a child process)."""
    import torch

    torch.set_num_threads(1)
    with Replayer(args["path"], engine=args["kind"], device=args["device"], python=args["python"],
                  model_path=args["model_path"], weights_from=args["weights_from"]) as rp:
        cfg = EngineConfig.from_dict(args["config"])
        return rp.replay_range(args["steps"], cfg, mode=args["mode"], batch=args["batch"], write=False,
                               allow_incomplete=args["allow_incomplete"])
