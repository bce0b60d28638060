"""The reference engine: a pure-PyTorch Qwen2 / Llama engine that emulates vLLM V0 / V1.

It runs the HF checkpoint's weights through the forward in :mod:`._ref_model`
(explicit KV buffers, batched decode) and reproduces, switch by switch, each way an
inference engine can make its logprobs mean something other than the trainer's
(DESIGN §1, §4). Every behaviour below is tied to the real vLLM behaviour it stands for.

**Logprob mode** (``config.logprobs_mode``): ``raw_logprobs`` is ``log_softmax`` of the
raw logits, vLLM V1's default; ``processed_logprobs`` is ``log_softmax`` after
temperature, top-k and top-p (masked tokens ``-inf``, the rest renormalized over the
nucleus), what V0 returned and what a trainer computes from tempered logits (pass the
same ``top_p`` to :func:`replay.trainer.scoring.trainer_logprobs` to compare like with like).
See :mod:`replay.engines.sampling`. The sampling noise is the engine's own (an exponential race
on each request's generator), so token choices do not reproduce vLLM's for a seed.

**lm_head dtype** (``config.lm_head_dtype``): the final projection runs in bf16 (V1
default) or float32 (``hf_overrides={"head_dtype": "float32"}``); the logits then go
to the sampler as float32, as in vLLM.

**Prefix cache** (``config.enable_prefix_caching``): full blocks of ``block_size``
tokens are cached by content across requests and across ``generate()`` calls, see
:mod:`._ref_cache`. Within a call each request hits what it would if the requests were
prefilled one at a time in submission order (the engine batches the prefills it can).
Nothing here resets the cache on a weight update, neither a concurrent update nor a
paused one (the source's fix pauses with ``clear_cache=False``), nor
:meth:`ReferenceEngine.load_weights` between calls (vLLM's ``collective_rpc`` weight
load does not reset the cache either): blocks computed by old weights are reused,
stale, by any later request with the same prefix. ``GenResult.num_cached_tokens``
counts the prompt tokens served from the cache. :meth:`score` does not read the cache
(vLLM skips prefix-cache hits for requests that ask for prompt logprobs) but stores
the blocks it computes, as vLLM does.

**Weight updates inside generate()** (``WeightUpdate(version, after_step)``): decode
step ``k`` produces generated token ``k`` of every running request (step 0 is the
prefill). An update with ``after_step=s`` takes effect between steps ``s-1`` and ``s``.
vLLM loads weights between two engine steps, all at once: the engine core handles a
``collective_rpc`` utility call in its busy loop between ``step()`` calls
(``vllm/v1/engine/core.py``, ``EngineCoreProc.run_busy_loop``: ``_process_input_queue``
then ``_process_engine_step``), and the workers run it in order after the model
execution before it. So no step ever runs a model with some layers new and some old:

* the reported version (``GenResult.token_versions``) becomes the new one for tokens
  ``k >= s``, in both modes: an RL framework bumps its version counter when it starts
  the update and stamps each token it receives with the counter;
* from the step the new weights reach on, every step runs them, over the KV that
  in-flight requests computed with the old weights (kept in both modes: neither a
  concurrent load nor ``pause_generation(mode="keep")`` touches running requests' KV);
* ``weight_update="paused"``: generation pauses, every weight loads, generation resumes
  (``pause_generation(mode="keep")`` → ``load_weights`` → ``resume_generation()``;
  V0's blocking update has the same semantics). The pause completes only once no batch
  is in flight (``EngineCoreProc.pause_scheduler``: ``PAUSED_ALL`` stops scheduling, and
  its future completes once ``has_work()`` is false, the batch queue empty), so step
  ``s`` runs the new weights: a clean version boundary, with or without async
  scheduling;
* ``weight_update="concurrent"``: the load runs with the scheduler going. Without async
  scheduling it still lands between two steps, so it is the paused update's boundary
  exactly (tested against vLLM's CPU build, where both give the same bits);
* ``async_scheduling=True`` with a concurrent update: vLLM V1 schedules and launches
  step ``t+1`` before it returns step ``t`` (``EngineCore.step_with_batch_queue``), so
  the batch in flight when the load is handled computes with the old weights, and its
  tokens reach the framework after it bumped its counter. For ``s > 0`` the weights
  reach step ``s+1``: token ``s`` is reported as the new version but computed with the
  old weights. (At ``s == 0`` nothing is in flight yet, no lag.) vLLM's CPU build
  forces async scheduling off, so this one is grounded in the source only.

**Continuous batching** (``GenRequest.arrival_step``): a request submitted at engine step
``a`` of the call is prefilled at step ``a`` (hitting the blocks that requests prefilled
before it stored, as vLLM's scheduler admits a new request into the running batch) and
emits its token ``k`` at step ``a + k``; an update at step ``s`` reaches it at its token
``s - a``. Tested against vLLM's CPU build, requests added to the running engine between
steps.

An update not finished when the call ends is completed before ``generate()`` returns.

**Stops**: a request ends after a token in ``stop_token_ids`` or, unless the engine
was built with ``ignore_eos=True``, the checkpoint's ``eos_token_id`` (vLLM's default);
a forced request (``forced_output_ids``) ends after its last forced token only, since the
recording it comes from went on past any EOS or stop token inside it;
the stop token is part of ``output_ids``, as in vLLM's ``token_ids``.

**Seeds**: each request samples from its own ``torch.Generator`` (seeded from
``GenRequest.seed``, else from the engine seed and the request id), and every GEMM
row is computed independently of the others (see :mod:`._ref_model`), so a request
gives the same tokens and logprobs whatever batch it runs in. Same inputs, same bits.
On CPU the engine runs its ops on ``num_threads`` threads (1 by default; restored
after each call): results then do not depend on the machine's core count, and tiny
ops do not pay for thread synchronisation.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from replay.errors import BadInput
from replay.fixes import EngineConfig
from replay.engines.base import GenGroup, GenRequest, GenResult, ScoreRequest, ScoreResult, WeightUpdate


@dataclass
class _Running:
    """One request's state during generate()."""

    req: GenRequest
    kv: Any                                  # RequestKV
    gen: Any                                 # torch.Generator
    out: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_lps: list[list[float]] = field(default_factory=list)
    cached: int = 0
    finish: str | None = None


@dataclass(frozen=True)
class _Action:
    """One scheduled part of a weight update: at decode ``step``, the reported version
    changes (``weights=False``) or every unit serves the new version (``weights=True``)."""

    step: int
    weights: bool
    version: int


@dataclass
class _Group:
    """One group's state during generate_groups(): its serving view, reported version, pending actions."""

    view: Any                                # ServingView
    version: int                             # the version reported for the tokens it emits now
    actions: list[_Action]
    runs: list[_Running]


class ReferenceEngine:
    """Pure-PyTorch engine over a HF-format Qwen2 / Llama checkpoint (the checkpoint is version 0)."""

    name = "reference"
    supports_forced_output = True   # GenRequest.forced_output_ids: teacher forcing through generate()

    def __init__(self, model_path: str | Path, config: EngineConfig | None = None, device: str = "cpu",
                 seed: int = 0, *, block_size: int = 16, ignore_eos: bool = False,
                 max_cached_blocks: int = 4096, initial_version: int = 0, num_threads: int | None = 1):
        from replay.models import load_config, load_state_dict, torch_dtype
        from replay.engines.reference.cache import PrefixCache
        from replay.engines.reference.model import ArchConfig, ServingView

        t0 = time.perf_counter()
        self.config = config or EngineConfig()
        self.device = device
        self.seed = seed
        self.ignore_eos = ignore_eos           # True: the model's EOS does not end a request
        self.num_threads = num_threads         # CPU threads for the engine's ops (None: leave torch's setting)
        self.model_path = Path(model_path)
        self.arch = ArchConfig.from_hf(load_config(model_path))
        self._dtype = torch_dtype(self.config.dtype)
        self._head_dtype = torch_dtype(self.config.lm_head_dtype)
        self._weights: dict[int, Any] = {}
        self.cache = PrefixCache(block_size=block_size, max_blocks=max_cached_blocks)
        self.version: int | None = None
        self._view = ServingView.uniform(initial_version, self.arch.num_layers)
        self.load_weights(initial_version, load_state_dict(model_path), activate=True)
        self.start_seconds = time.perf_counter() - t0

    @property
    def effective(self) -> dict:
        """What this engine runs with: its config, block size, device and thread count."""
        return {**self.config.to_dict(), "block_size": self.cache.block_size, "device": str(self.device),
                "num_threads": self.num_threads}

    # ----------------------------------------------------------------- weights

    @property
    def versions(self) -> list[int]:
        """Every loaded weight version."""
        return sorted(self._weights)

    def load_weights(self, version: int, state_dict: Mapping[str, Any], *, activate: bool = True) -> None:
        """Keep ``version`` (HF names; names left out are taken from the version serving now)
        and, with ``activate``, serve it from now on. The prefix cache is not reset."""
        from replay.engines.reference.model import split_state_dict

        base = self._weights.get(self.version) if self.version is not None else None
        self._weights[int(version)] = split_state_dict(dict(state_dict), self.arch, self._dtype,
                                                       self._head_dtype, self.device, base)
        if activate:
            self.activate(version)

    def activate(self, version: int) -> None:
        """Serve an already loaded ``version`` (all units at once); the prefix cache is kept."""
        self._view = self._uniform(version)
        self.version = int(version)

    def reset_prefix_cache(self) -> None:
        """Drop every prefix-cache entry (vLLM's ``reset_prefix_cache()``)."""
        self.cache.clear()

    def close(self) -> None:
        self._weights.clear()
        self.cache.clear()

    @contextlib.contextmanager
    def _threads(self):
        import torch

        if self.num_threads is None or not str(self.device).startswith("cpu"):
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # ---------------------------------------------------------------- schedule

    def _schedule(self, updates: Sequence[WeightUpdate]) -> list[_Action]:
        """The updates' actions in application order (at one step: an update's label before its
        weights, updates in their order)."""
        actions: list[tuple[int, int, _Action]] = []
        for order, u in enumerate(sorted(updates, key=lambda u: u.after_step)):
            if u.version not in self._weights:
                raise BadInput(f"weight update to version {u.version} at step {u.after_step}, but that "
                               f"version was never loaded; loaded: {self.versions}", field="updates")
            if u.after_step < 0:
                raise BadInput(f"after_step must be >= 0, not {u.after_step}", field="updates")
            s = u.after_step
            lag = self.config.async_scheduling and self.config.weight_update == "concurrent" and s > 0
            actions.append((s, order, _Action(s, False, u.version)))
            actions.append((s + int(lag), order, _Action(s + int(lag), True, u.version)))
        actions.sort(key=lambda a: (a[0], a[1], a[2].weights))
        return [a[2] for a in actions]

    def _apply(self, action: _Action, state: "_Group") -> None:
        if action.weights:
            state.view = self._uniform(action.version)
        else:
            state.version = action.version

    def _uniform(self, version: int) -> Any:
        from replay.engines.reference.model import ServingView

        if version not in self._weights:
            raise BadInput(f"weight version {version} was never loaded; loaded: {self.versions}",
                           field="version")
        return ServingView.uniform(int(version), self.arch.num_layers)

    # ---------------------------------------------------------------- generate

    def _check_requests(self, requests: Sequence[Any], kind: str) -> None:
        seen = set()
        for r in requests:
            if r.request_id in seen:
                raise BadInput(f"request id {r.request_id!r} appears twice in one {kind} call",
                               field="request_id", request_id=r.request_id)
            seen.add(r.request_id)
            if not r.prompt_ids:
                raise BadInput("prompt is empty", field="prompt_ids", request_id=r.request_id)
            bad = [t for t in r.prompt_ids if not 0 <= t < self.arch.vocab_size]
            if bad:
                raise BadInput(f"token id {bad[0]} outside the vocabulary (size {self.arch.vocab_size})",
                               field="prompt_ids", request_id=r.request_id)
            if r.temperature < 0:
                raise BadInput(f"temperature must be >= 0, not {r.temperature}", field="temperature",
                               request_id=r.request_id)
            if not 0 < r.top_p <= 1:
                raise BadInput(f"top_p must be in (0, 1], not {r.top_p}", field="top_p", request_id=r.request_id)
        for r in requests:
            if getattr(r, "forced_output_ids", None) is not None:
                bad = [t for t in r.forced_output_ids if not 0 <= t < self.arch.vocab_size]
                if not r.forced_output_ids or bad:
                    raise BadInput("forced_output_ids must be non-empty token ids inside the vocabulary",
                                   field="forced_output_ids", request_id=r.request_id)
            if kind == "generate" and r.arrival_step < 0:
                raise BadInput(f"arrival_step must be >= 0, not {r.arrival_step}", field="arrival_step",
                               request_id=r.request_id)
            if kind == "generate" and r.max_tokens < 1:
                raise BadInput(f"max_tokens must be >= 1, not {r.max_tokens}", field="max_tokens",
                               request_id=r.request_id)

    def generate(self, requests: Sequence[GenRequest], updates: Sequence[WeightUpdate] = ()) -> list[GenResult]:
        """Generate every request as one batch, applying ``updates`` at their decode steps."""
        return self.generate_groups([GenGroup(list(requests), list(updates))])[0]

    def generate_groups(self, groups: Sequence[GenGroup]) -> list[list[GenResult]]:
        """Generate several groups (recorded steps) as one batch, each with its own serving
        version and update schedule, decode steps counted from the call's start.

        Decode rows of groups whose units serve the same versions share one forward; every
        row's bits are those of a separate ``generate()`` (rows are batch-independent). The
        engine ends serving what the last group ends with. Groups share no prefix-cache
        history, so several groups under prefix caching are refused.
        """
        import torch

        from replay.engines.reference.model import Chunk, RequestKV, forward, project
        from replay.engines.sampling import request_generator

        if len(groups) > 1 and self.config.enable_prefix_caching:
            raise BadInput("several groups in one call under prefix caching: a group's prefix hits depend "
                           "on the groups before it; generate them one call at a time", field="groups")
        states = []
        for g in groups:
            self._check_requests(g.requests, "generate")
            view = self._uniform(g.serving) if g.serving is not None else self._view.copy()
            version = int(g.serving) if g.serving is not None else self.version
            assert version is not None  # __init__ activates the initial version
            runs = [_Running(r, RequestKV.empty(self.arch, len(r.prompt_ids) + r.max_tokens, self._dtype,
                                                self.device),
                             request_generator(r.seed, self.seed, r.request_id)) for r in g.requests]
            states.append(_Group(view, version, self._schedule(g.updates), runs))
        step = 0
        with torch.no_grad(), self._threads():
            while any(run.finish is None for st in states for run in st.runs):
                batches: dict[tuple, list[tuple[_Running, _Group]]] = {}
                for st in states:
                    while st.actions and st.actions[0].step <= step:
                        self._apply(st.actions.pop(0), st)
                    for run in st.runs:
                        if run.finish is None and run.req.arrival_step <= step:
                            kind = "decode" if run.out else "prefill"   # a request prefills when it arrives
                            batches.setdefault((kind, st.view.key()), []).append((run, st))
                for (kind, _), active in batches.items():
                    view = active[0][1].view
                    if kind == "prefill" and not self.config.enable_prefix_caching:  # one forward
                        chunks = [Chunk(list(run.req.prompt_ids), 0, run.kv, [len(run.req.prompt_ids) - 1])
                                  for run, _ in active]
                        h = forward(chunks, self._weights, view, self.arch, self._dtype, self.device)
                    elif kind == "prefill":  # in waves: a request waits for an earlier one it could hit
                        h = self._cached_prefills([run for run, _ in active], view)
                    else:
                        chunks = [Chunk([run.out[-1]], run.kv.length, run.kv, [0]) for run, _ in active]
                        h = forward(chunks, self._weights, view, self.arch, self._dtype, self.device)
                    logits = project(h, self._weights[view.head].lm_head).cpu()
                    for (run, st), row in zip(active, logits):
                        self._emit(run, row, st.version)
                step += 1
        for st in states:
            for action in st.actions:  # finish an update the call outlived
                self._apply(action, st)
        if states:
            self._view, self.version = states[-1].view, states[-1].version
        if self.config.enable_prefix_caching:
            for run in (run for st in states for run in st.runs):
                self.cache.store(list(run.req.prompt_ids) + run.out, run.kv)
        return [[GenResult(request_id=run.req.request_id, output_ids=run.out, logprobs=run.lps,
                           token_versions=run.versions, finish_reason=run.finish or "length",
                           num_cached_tokens=run.cached,
                           topk_ids=run.topk_ids if run.req.num_topk > 0 else None,
                           topk_logprobs=run.topk_lps if run.req.num_topk > 0 else None) for run in st.runs]
                for st in states]

    def _cached_prefills(self, runs: list[_Running], view: Any) -> Any:
        """Prefill ``runs`` under prefix caching with the hits of one-at-a-time prefills in
        order (each request reuses the full blocks every earlier one stored), in as few
        forwards as that allows: a wave holds every request whose hit no earlier pending
        request could still extend; the rest wait for the next wave. Identical prompts
        (a GRPO group) take two waves: the first computes, the others hit."""
        import torch

        from replay.engines.reference.model import Chunk, forward

        bs = self.cache.block_size
        prompts = [list(run.req.prompt_ids) for run in runs]
        hidden: dict[int, Any] = {}
        pending = list(range(len(runs)))
        while pending:
            wave: list[int] = []
            later: list[int] = []
            for j in pending:
                hit = self.cache.peek(prompts[j]) // bs
                usable = (len(prompts[j]) - 1) // bs
                waits = any(_shared_blocks(prompts[i], prompts[j], bs, usable) > hit for i in wave + later)
                (later if waits else wave).append(j)
            chunks = []
            for j in wave:
                run, prompt = runs[j], prompts[j]
                run.cached = self.cache.lookup(prompt, run.kv)
                chunks.append(Chunk(prompt[run.cached:], run.cached, run.kv, [len(prompt) - run.cached - 1]))
            out = forward(chunks, self._weights, view, self.arch, self._dtype, self.device)
            for row, j in enumerate(wave):
                self.cache.store(prompts[j], runs[j].kv)
                hidden[j] = out[row:row + 1]
            pending = later
        return torch.cat([hidden[j] for j in range(len(runs))], 0)

    def _emit(self, run: _Running, row: Any, version: int) -> None:
        """Sample one token for ``run`` from its logits ``row`` and record it."""
        from replay.engines.sampling import logprobs_of, process_logits, sample, top_logprobs

        r = run.req
        processed = process_logits(row, r.temperature, r.top_k, r.top_p)
        forced = r.forced_output_ids
        # Teacher forcing (the replayer's score mode): the recorded token instead of a sample,
        # everything else (KV, updates, prefix cache, logprob mode) as in generation.
        token = int(forced[len(run.out)]) if forced is not None else sample(processed, r.temperature, run.gen)
        lp = logprobs_of(row, processed, self.config.logprobs_mode)
        run.out.append(token)
        run.lps.append(float(lp[token]))
        run.versions.append(int(version))
        if r.num_topk > 0:
            ids, vals = top_logprobs(lp, r.num_topk)
            run.topk_ids.append(ids)
            run.topk_lps.append(vals)
        if forced is not None:   # the recorded tokens say where it ended (an EOS inside was not a stop)
            if len(run.out) >= len(forced):
                run.finish = "length"
        elif token in r.stop_token_ids or (not self.ignore_eos and token in self.arch.eos_token_ids):
            run.finish = "stop"
        elif len(run.out) >= r.max_tokens:
            run.finish = "length"

    def hidden_states(self, token_ids: Sequence[int]) -> list[Any]:
        """Residual stream of every position of ``token_ids`` after the embeddings and after
        each layer (``num_layers + 1`` float32 numpy arrays ``[len, hidden]``), under the
        version serving now: what a layer bisection compares between two configs."""
        import torch

        from replay.engines.reference.model import Chunk, RequestKV, forward

        ids = list(token_ids)
        if not ids:
            raise BadInput("no tokens to run", field="token_ids")
        kv = RequestKV.empty(self.arch, len(ids), self._dtype, self.device)
        states: list[Any] = []
        with torch.no_grad(), self._threads():
            forward([Chunk(ids, 0, kv, [len(ids) - 1])], self._weights, self._view, self.arch, self._dtype,
                    self.device, capture=states)
        return [s.float().cpu().numpy() for s in states]

    # ------------------------------------------------------------------- score

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Teacher-forced logprobs of each request's output tokens under the version serving now,
        with the config's logprobs mode (processed: temperature, top-k, top-p applied) and lm_head dtype."""
        import torch

        from replay.engines.reference.model import Chunk, RequestKV, forward, project
        from replay.engines.sampling import logprobs_of, process_logits, top_logprobs

        self._check_requests(requests, "score")
        todo = [r for r in requests if r.output_ids]
        chunks = []
        for r in todo:
            bad = [t for t in r.output_ids if not 0 <= t < self.arch.vocab_size]
            if bad:
                raise BadInput(f"token id {bad[0]} outside the vocabulary (size {self.arch.vocab_size})",
                               field="output_ids", request_id=r.request_id)
            seq = list(r.prompt_ids) + list(r.output_ids)
            kv = RequestKV.empty(self.arch, len(seq), self._dtype, self.device)
            p = len(r.prompt_ids)
            chunks.append(Chunk(seq[:-1], 0, kv, list(range(p - 1, p - 1 + len(r.output_ids)))))
        by_id: dict[str, ScoreResult] = {}
        if chunks:
            with torch.no_grad(), self._threads():
                h = forward(chunks, self._weights, self._view, self.arch, self._dtype, self.device)
                logits = project(h, self._weights[self._view.head].lm_head).cpu()
            row = 0
            for r, c in zip(todo, chunks):
                res = ScoreResult(r.request_id, [], [] if r.num_topk > 0 else None,
                                  [] if r.num_topk > 0 else None)
                for tok in r.output_ids:
                    raw = logits[row]
                    lp = logprobs_of(raw, process_logits(raw, r.temperature, r.top_k, r.top_p),
                                     self.config.logprobs_mode)
                    res.logprobs.append(float(lp[tok]))
                    if r.num_topk > 0:
                        assert res.topk_ids is not None and res.topk_logprobs is not None  # made as lists above
                        ids, vals = top_logprobs(lp, r.num_topk)
                        res.topk_ids.append(ids)
                        res.topk_logprobs.append(vals)
                    row += 1
                by_id[r.request_id] = res
                if self.config.enable_prefix_caching:
                    self.cache.store(list(r.prompt_ids) + list(r.output_ids), c.kv)
        return [by_id.get(r.request_id) or ScoreResult(r.request_id, [], [] if r.num_topk > 0 else None,
                                                       [] if r.num_topk > 0 else None) for r in requests]


def _shared_blocks(a: list[int], b: list[int], block_size: int, usable: int) -> int:
    """Leading full blocks of ``a`` (as a prefill stores them) equal to ``b``'s, at most ``usable``."""
    n = min(len(a) // block_size, usable)
    k = 0
    while k < n and a[k * block_size:(k + 1) * block_size] == b[k * block_size:(k + 1) * block_size]:
        k += 1
    return k

