"""Record rollouts straight from vLLM: ``RequestOutput`` objects or OpenAI-style JSON.

:func:`record_outputs` takes what ``LLM.generate`` (or an ``AsyncLLM`` stream's final
output) returns and writes one ``rollouts`` row per completion, with the sampled
token's logprob at each position, and the top-k of each position into ``topk``
(``source="engine"``). Each row says under which semantics its logprobs were made:
``logprobs_mode``, ``engine="vllm-<version>"`` and the :class:`~replay.fixes.EngineConfig`
id, read from the ``llm`` object (:func:`describe_llm`).

:func:`record_openai_response` does the same for an OpenAI-compatible completions or
chat-completions response served with ``return_tokens_as_token_ids`` (tokens come
back as ``"token_id:123"``), the path of pipelines that talk to ``vllm serve``.

:func:`attach` is the one call for a loop on vLLM's ``LLM``: it opens the recorder with
the complete engine config read from vLLM's own config objects (refusing one replay cannot
model), puts the checkpoint in the recording (``Recorder.model``), and returns a
:class:`RecordedLLM` whose ``generate`` records every rollout with its sampling
parameters, weight versions and submission order, and whose ``update_weights`` loads new
weights into the running engine, stores them and records the update::

    run = attach(llm, "recordings/run-1", weight_update="paused")
    for k in range(steps):
        with run.step(k):
            outputs = run.generate(prompts, sampling_params, step=k, rewards=reward_fn)
        ...   # train, with replay.integrations.torch.TrainerHook(run.rec) on the logprob pass
        run.update_weights(k + 1, model.state_dict(), step=k)
    run.close()

:func:`attach_async` does the same for an ``AsyncLLM`` whose weights are updated while
requests are in flight (:class:`RecordedAsyncLLM`): each token carries the version vLLM
stamps on it, and a replay finds from those versions where each update landed and when each
request joined the running batch.

vLLM is never imported here at module level: the functions read attributes of the objects
given.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from replay.errors import BadInput
from replay.integrations import as_version
from replay.engines.factory import vllm_version
from replay.fixes import EngineConfig

# ------------------------------------------------------------------- engine semantics


@dataclass(frozen=True)
class EngineInfo:
    """What a rollout row records about the engine that produced it."""

    engine: str                        # "vllm-<version>"
    logprobs_mode: str                 # raw_logprobs | processed_logprobs | raw_logits | ...
    engine_config: EngineConfig | None  # the semantics as a replay EngineConfig, when derivable
    settings: dict                     # the vLLM settings read (for the run config)


def _dtype_name(dt: Any) -> str:
    return str(dt).removeprefix("torch.")


def _vllm_config(llm: Any) -> Any:
    for path in (("llm_engine", "vllm_config"), ("vllm_config",), ("engine", "vllm_config")):
        obj = llm
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise BadInput(f"cannot find a vllm_config on {type(llm).__name__}; pass an LLM, an AsyncLLM "
                   "or an LLMEngine", field="llm")


def describe_llm(llm: Any, *, weight_update: str = "concurrent") -> EngineInfo:
    """The logprob semantics of a vLLM ``LLM`` / ``AsyncLLM`` / ``LLMEngine``.

    ``weight_update`` is how the pipeline loads new weights ("concurrent" or
    "paused"); the engine object cannot tell, so the caller says it.
    """
    cfg = _vllm_config(llm)
    mc, cc, sc = cfg.model_config, cfg.cache_config, cfg.scheduler_config
    mode = str(getattr(mc, "logprobs_mode", "raw_logprobs"))
    try:
        head = _dtype_name(mc.head_dtype)
    except Exception:
        head = _dtype_name(getattr(mc, "dtype", "unknown"))
    settings: dict[str, Any] = {
        "logprobs_mode": mode,
        "enable_prefix_caching": bool(getattr(cc, "enable_prefix_caching", False)),
        "async_scheduling": bool(getattr(sc, "async_scheduling", False)),
        "dtype": _dtype_name(getattr(mc, "dtype", "unknown")),
        "head_dtype": head,
        "model": str(getattr(mc, "model", "")),
        "enforce_eager": bool(getattr(mc, "enforce_eager", False)),
        # what shapes the KV-cache blocks (prefix-cache hits), the batches and the length: a vLLM
        # replay takes these as they were (see replay.engines.factory.VLLM_REPLAY_SETTINGS)
        "block_size": getattr(cc, "block_size", None),
        "max_model_len": getattr(mc, "max_model_len", None),
        "max_num_seqs": getattr(sc, "max_num_seqs", None),
        "max_num_batched_tokens": getattr(sc, "max_num_batched_tokens", None),
        "enable_chunked_prefill": getattr(sc, "enable_chunked_prefill", None),
        "seed": getattr(mc, "seed", None),
        "quantization": getattr(mc, "quantization", None),
        "vllm_version": vllm_version() or "unknown",
    }
    try:
        ec = EngineConfig(logprobs_mode=mode, enable_prefix_caching=settings["enable_prefix_caching"],
                          async_scheduling=settings["async_scheduling"], weight_update=weight_update,
                          lm_head_dtype=head, dtype=settings["dtype"])
    except BadInput:
        ec = None  # a mode or dtype outside what replay models (raw_logits, float16, ...)
    return EngineInfo(engine=f"vllm-{vllm_version() or 'unknown'}", logprobs_mode=mode, engine_config=ec, settings=settings)


# ---------------------------------------------------------------------- helpers


def _per_output(value: Any, n: int, name: str) -> list:
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise BadInput(f"{name} has {len(value)} entries but there are {n} outputs", field=name)
    return list(value)


def _per_completion(value: Any, i: int, n_comp: int, name: str, request_id: str) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != n_comp:
            raise BadInput(f"{name} has {len(value)} values but the request has {n_comp} completions",
                           field=name, request_id=request_id)
        return value[i]
    return value


def _token_versions(weight_version: Any, completion: Any, n: int, request_id: str) -> list[int] | None:
    if weight_version is None:
        spans = getattr(completion, "weight_versions", None)
        if not spans:
            return None
        out: list[int | None] = [None] * n
        for span in spans:
            v = as_version(span.version)
            for j in range(max(0, span.start), min(n, span.end)):
                out[j] = v
        return None if any(v is None for v in out) else out  # type: ignore[return-value]
    if isinstance(weight_version, Sequence) and not isinstance(weight_version, (str, bytes)):
        if len(weight_version) != n:
            raise BadInput(f"weight_version has {len(weight_version)} entries but the completion has {n} "
                           "tokens", field="weight_version", request_id=request_id)
        return [int(v) for v in weight_version]
    return [int(weight_version)] * n


def position_logprobs(entry: Mapping[int, Any], token_id: int, num_topk: int, *, request_id: str = "",
                      pos: int = 0) -> tuple[float, list[int], list[float]]:
    """The sampled token's logprob and the top ``num_topk`` (by rank) of one position's dict."""
    if entry is None or token_id not in entry:
        raise BadInput(f"the logprobs of position {pos} do not hold the sampled token {token_id}; "
                       "generate with SamplingParams(logprobs=0) or more", field="logprobs",
                       request_id=request_id)
    sampled = float(entry[token_id].logprob)
    if not num_topk:
        return sampled, [], []
    ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 62, kv[0]))
    top = ranked[:num_topk]
    return sampled, [int(t) for t, _ in top], [float(lp.logprob) for _, lp in top]


def write_topk(rec: Any, step: int, request_id: str, top_ids: list, top_lps: list) -> int:
    """Write the engine's top-k rows of one sequence; returns the positions written.

    Positions are grouped by their width (a position can list fewer than k tokens), and
    a position whose top-k holds a non-finite logprob (``-inf``: outside the top-k /
    top-p support under processed_logprobs) is left out, since the topk table keeps
    finite logprobs only; its sampled token's logprob is in the rollout row anyway.
    """
    groups: dict[int, list[int]] = {}
    for pos, (ids, lps) in enumerate(zip(top_ids, top_lps)):
        if ids and all(math.isfinite(v) for v in lps):
            groups.setdefault(len(ids), []).append(pos)
    for width, positions in sorted(groups.items()):
        rec.topk(step=step, request_id=request_id, source="engine", ids=[top_ids[p] for p in positions],
                 logprobs=[top_lps[p] for p in positions], positions=positions)
    return sum(len(p) for p in groups.values())


# ------------------------------------------------------------------- RequestOutput


def record_outputs(rec: Any, outputs: Sequence[Any], *, step: int, sampling_params: Any = None,
                   llm: Any = None, weight_version: Any = None, group_ids: Sequence[str] | None = None,
                   rewards: Sequence[Any] | None = None, num_topk: int | None = None,
                   weight_update: str = "concurrent", engine_info: EngineInfo | None = None,
                   events: bool = True) -> list[str]:
    """Record vLLM ``RequestOutput`` objects as rollouts; returns the request ids written.

    * ``sampling_params``: one ``SamplingParams`` or one per output (temperature, top_p,
      top_k, seed, and the default ``num_topk`` = its ``logprobs``).
    * ``llm``: the ``LLM`` / ``AsyncLLM``, for ``logprobs_mode``, version and config
      (or pass ``engine_info`` from :func:`describe_llm` once).
    * ``weight_version``: an int, a per-token list (one completion), or None to use the
      spans vLLM reports in ``CompletionOutput.weight_versions`` when they are ints.
    * ``group_ids``: one per output (default: the request id, so the n completions of a
      request form a group); ``rewards``: one per output, a float or a list of n.
    * n > 1 completions become separate rollouts ``"<request_id>:<index>"``.
    * ``events``: also write a ``request_finished`` event per rollout.
    """
    if engine_info is None and llm is not None:
        engine_info = describe_llm(llm, weight_update=weight_update)
    sps = _per_output(sampling_params, len(outputs), "sampling_params")
    gids = _per_output(group_ids, len(outputs), "group_ids")
    rws = _per_output(rewards, len(outputs), "rewards")
    written: list[str] = []
    for out, sp, gid, reward in zip(outputs, sps, gids, rws):
        req = str(out.request_id)
        comps = list(out.outputs)
        k = int(num_topk if num_topk is not None else (getattr(sp, "logprobs", None) or 0))
        for i, comp in enumerate(comps):
            rid = req if len(comps) == 1 else f"{req}:{comp.index}"
            ids = [int(t) for t in comp.token_ids]
            if comp.logprobs is None:
                raise BadInput("the output has no logprobs; generate with SamplingParams(logprobs=0) "
                               "or more", field="logprobs", step=step, request_id=rid)
            entries = list(comp.logprobs)
            if len(entries) != len(ids):
                raise BadInput(f"{len(entries)} logprob entries for {len(ids)} tokens", field="logprobs",
                               step=step, request_id=rid)
            lps, top_ids, top_lps = [], [], []
            for pos, (tok, entry) in enumerate(zip(ids, entries)):
                lp, tid, tlp = position_logprobs(entry, tok, k, request_id=rid, pos=pos)
                lps.append(lp)
                top_ids.append(tid)
                top_lps.append(tlp)
            versions = _token_versions(weight_version, comp, len(ids), rid)
            rec.rollout(
                step=step, request_id=rid, group_id=str(gid) if gid is not None else req,
                prompt_ids=[int(t) for t in (out.prompt_token_ids or [])], output_ids=ids, logprobs=lps,
                token_versions=versions,
                reward=_per_completion(reward, i, len(comps), "rewards", rid),
                finish_reason=comp.finish_reason,
                temperature=getattr(sp, "temperature", None), top_p=getattr(sp, "top_p", None),
                top_k=getattr(sp, "top_k", None), seed=getattr(sp, "seed", None),
                logprobs_mode=engine_info.logprobs_mode if engine_info else None,
                engine=engine_info.engine if engine_info else "vllm",
                engine_config=engine_info.engine_config.id if engine_info and engine_info.engine_config else None,
                num_cached_tokens=out.num_cached_tokens,
            )
            if k:
                write_topk(rec, step, rid, top_ids, top_lps)
            if events:
                rec.event("request_finished", step=step, request_id=rid,
                          weight_version=versions[-1] if versions else None, finish_reason=comp.finish_reason,
                          num_tokens=len(ids), num_cached_tokens=out.num_cached_tokens)
            written.append(rid)
    return written


# ------------------------------------------------------------- OpenAI-compatible JSON


def _token_id(token: Any, where: str) -> int:
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token[len("token_id:"):])
        except ValueError:
            pass
    raise BadInput(f"{where}: token {token!r} is not of the form 'token_id:<int>'; serve with "
                   "return_tokens_as_token_ids=True", field="logprobs")


def _choice_tokens(choice: Mapping, num_topk: int, where: str) -> tuple[list[int], list[float], list, list]:
    lp = choice.get("logprobs")
    if not lp:
        raise BadInput(f"{where}: no logprobs; request logprobs (and return_tokens_as_token_ids)",
                       field="logprobs")
    ids, lps, top_ids, top_lps = [], [], [], []
    if "content" in lp:  # chat completions
        for j, item in enumerate(lp["content"] or []):
            ids.append(_token_id(item["token"], f"{where} position {j}"))
            lps.append(float(item["logprob"]))
            top = (item.get("top_logprobs") or [])[:num_topk]
            top_ids.append([_token_id(t["token"], f"{where} position {j}") for t in top])
            top_lps.append([float(t["logprob"]) for t in top])
    else:  # completions
        tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens", []))
        for j, (tok, val, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"], tops)):
            ids.append(_token_id(tok, f"{where} position {j}"))
            lps.append(float(val))
            items = sorted((top or {}).items(), key=lambda kv: -kv[1])[:num_topk]
            top_ids.append([_token_id(t, f"{where} position {j}") for t, _ in items])
            top_lps.append([float(v) for _, v in items])
    if choice.get("token_ids") is not None and [int(t) for t in choice["token_ids"]] != ids:
        raise BadInput(f"{where}: token_ids disagree with the logprobs' tokens", field="token_ids")
    return ids, lps, top_ids, top_lps


def record_openai_response(rec: Any, response_json: Mapping, *, step: int, prompt_ids: Sequence[int] | None = None,
                           group_id: str | None = None, rewards: Sequence[float] | float | None = None,
                           weight_version: int | None = None, temperature: float | None = None,
                           top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                           logprobs_mode: str | None = None, engine: str | None = None,
                           engine_config: str | None = None, num_topk: int = 0,
                           request_id: str | None = None) -> list[str]:
    """Record an OpenAI-compatible (chat) completions response as rollouts.

    Tokens must come as ``"token_id:<int>"`` (``return_tokens_as_token_ids``).
    ``prompt_ids`` defaults to the response's ``prompt_token_ids`` (vLLM adds them with
    ``return_token_ids``). One rollout per choice: ``"<id>"`` or ``"<id>:<index>"`` when
    there are several. Returns the request ids written.
    """
    choices = response_json.get("choices")
    if not isinstance(choices, list) or not choices:
        raise BadInput("the response has no choices", field="choices", step=step)
    base = request_id or str(response_json.get("id") or f"step{step}")
    if prompt_ids is None:
        prompt_ids = response_json.get("prompt_token_ids") or choices[0].get("prompt_token_ids")
    if prompt_ids is None:
        raise BadInput("prompt_ids not given and the response has no prompt_token_ids", field="prompt_ids",
                       step=step, request_id=base)
    written = []
    for i, choice in enumerate(choices):
        idx = choice.get("index", i)
        rid = base if len(choices) == 1 else f"{base}:{idx}"
        ids, lps, top_ids, top_lps = _choice_tokens(choice, num_topk, f"choice {idx} of response {base}")
        reward = _per_completion(rewards, i, len(choices), "rewards", rid)
        rec.rollout(step=step, request_id=rid, group_id=group_id or base, prompt_ids=[int(t) for t in prompt_ids],
                    output_ids=ids, logprobs=lps,
                    token_versions=None if weight_version is None else [int(weight_version)] * len(ids),
                    reward=reward, finish_reason=choice.get("finish_reason"), temperature=temperature,
                    top_p=top_p, top_k=top_k, seed=seed, logprobs_mode=logprobs_mode, engine=engine or "vllm",
                    engine_config=engine_config, num_cached_tokens=_cached_tokens(response_json))
        if num_topk:
            write_topk(rec, step, rid, top_ids, top_lps)
        written.append(rid)
    return written


def _cached_tokens(response_json: Mapping) -> int | None:
    usage = response_json.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    value = details.get("cached_tokens")
    return None if value is None else int(value)


# --------------------------------------------------------------------- one-call attach


def engine_run_config(llm: Any, *, weight_update: str = "concurrent", info: EngineInfo | None = None) -> dict:
    """``run_config["engine"]`` for a vLLM engine (or its :func:`describe_llm` ``info``): name,
    the complete replay :class:`~replay.fixes.EngineConfig` and the settings a vLLM replay
    takes as they were. A logprobs mode or dtype replay cannot model is refused, naming it."""
    info = info or describe_llm(llm, weight_update=weight_update)
    if info.engine_config is None:
        st = info.settings
        raise BadInput(f"this engine runs logprobs_mode={st['logprobs_mode']}, dtype={st['dtype']}, head "
                       f"dtype={st['head_dtype']}: a replay models raw_logprobs / processed_logprobs in "
                       "bfloat16 or float32 only", field="logprobs_mode")
    return {"name": info.engine, "config": info.engine_config.to_dict(), "config_id": info.engine_config.id,
            "settings": info.settings}


def load_weights(llm: Any, state_dict: Mapping[str, Any]) -> int:
    """Load HF-named, HF-shaped tensors into a running vLLM ``LLM`` (every worker), through
    the model's ``load_weights`` wrapped in vLLM's layer-wise reload (which the CPU build's
    packed kernels need); returns how many tensors each worker took."""
    from replay.engines.vllm.args import rpc_load_weights

    weights = [(k, v.detach() if hasattr(v, "detach") else v) for k, v in state_dict.items()]
    counts = llm.collective_rpc(rpc_load_weights, args=(weights,))
    return int(counts[0]) if counts else 0


class RecordedLLM:
    """A vLLM ``LLM`` with the recorder attached (see :func:`attach`). ``rec`` is the
    :class:`~replay.Recorder` (for the trainer's hooks and metrics); ``version`` the weight
    version serving now."""

    def __init__(self, llm: Any, rec: Any, *, weight_update: str = "paused", version: int = 0,
                 engine_info: EngineInfo | None = None):
        self.llm, self.rec, self.version = llm, rec, int(version)
        self.weight_update = weight_update
        self.info = engine_info or describe_llm(llm, weight_update=weight_update)
        self._stored: str | None = None

    def step(self, step: int):
        """``with run.step(k):`` marks step ``k``'s start and end (at the serving version)."""
        return self.rec.step(step, weight_version=self.version)

    def generate(self, prompts: Any, sampling_params: Any, *, step: int, rewards: Any = None,
                 group_ids: Sequence[str] | None = None, **kw: Any) -> list:
        """``llm.generate(prompts, sampling_params, ...)``, recorded: each completion a rollout
        (``"<request_id>:<index>"`` for n > 1) stamped with the serving version, in submission
        order. ``rewards``: one per output (a float or a list of n), or a function of a
        completion's token ids."""
        kw.setdefault("use_tqdm", False)
        outputs = self.llm.generate(prompts, sampling_params, **kw)
        if callable(rewards):
            fn = rewards
            rewards = [[fn(list(c.token_ids)) for c in o.outputs] for o in outputs]
        for out in outputs:   # vLLM returns outputs in submission order
            comps = list(out.outputs)
            for c in comps:
                rid = str(out.request_id) if len(comps) == 1 else f"{out.request_id}:{c.index}"
                self.rec.event("request_submitted", step=step, weight_version=self.version, request_id=rid)
        record_outputs(self.rec, outputs, step=step, sampling_params=sampling_params, weight_version=self.version,
                       group_ids=group_ids, rewards=rewards, engine_info=self.info)
        return outputs

    def update_weights(self, version: int, state_dict: Mapping[str, Any], *, step: int | None = None,
                       store: str = "delta") -> None:
        """Load ``state_dict`` into the engine between two steps and record it: the update
        (mode, version), and the weights (``store``: "delta" against the previous version
        stored, "full", or "hash" for a hash only)."""
        _check_store(store)
        self.rec.event("weights_update_start", step=step, weight_version=int(version), mode=self.weight_update,
                       between_steps=True)
        load_weights(self.llm, state_dict)
        set_version = getattr(getattr(self.llm, "llm_engine", None), "set_weight_version", None)
        if callable(set_version):
            set_version(str(int(version)))
        self.version = int(version)
        _store_weights(self.rec, self.version, state_dict, step=step, store=store)
        self.rec.event("weights_update_end", step=step, weight_version=self.version, mode=self.weight_update,
                       between_steps=True)

    def close(self) -> None:
        self.rec.close()

    def __enter__(self) -> "RecordedLLM":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.rec.close(error=exc)


def attach(llm: Any, path: Any, *, weight_update: str = "paused", run_config: dict | None = None,
           model: bool | str = True, store_model_weights: bool = True, **recorder_kw: Any) -> RecordedLLM:
    """Open a recording for a loop on the vLLM ``llm``: see the module doc. ``weight_update``
    is how the loop loads new weights ("paused": between steps, nothing in flight, which is
    what :meth:`RecordedLLM.update_weights` does; "concurrent" if generation goes on).
    ``model``: put the engine's checkpoint in the recording (True), another folder (a path),
    or nothing (False). ``recorder_kw`` go to :class:`~replay.Recorder`."""
    rec, info = _open(llm, path, weight_update, run_config, model, store_model_weights, recorder_kw)
    return RecordedLLM(llm, rec, weight_update=weight_update, engine_info=info)


def _open(llm: Any, path: Any, weight_update: str, run_config: dict | None, model: bool | str,
          store_model_weights: bool, recorder_kw: dict) -> tuple[Any, EngineInfo]:
    """The recorder of :func:`attach` / :func:`attach_async`: the engine config in the run
    config, the checkpoint in the recording."""
    from replay.record.recorder import Recorder

    info = describe_llm(llm, weight_update=weight_update)
    config = dict(run_config or {})
    config["engine"] = engine_run_config(llm, info=info)
    folder = info.settings.get("model") if model is True else (model or None)
    if folder:
        config.setdefault("model", str(folder))
    rec = Recorder(path, run_config=config, **recorder_kw)
    if folder:
        rec.model(folder, store_weights=store_model_weights)
    return rec, info


def _check_store(store: str) -> None:
    if store not in ("delta", "full", "hash"):
        raise BadInput(f"store must be delta, full or hash, not {store!r}", field="store")


def _store_weights(rec: Any, version: int, state_dict: Mapping[str, Any], *, step: int | None = None,
                  store: str = "delta") -> None:
    """Keep weight ``version`` in the recording: "delta" against the previous version stored,
    "full", or "hash" (its sha256 only; a replay takes it from ``--weights-from``)."""
    import torch

    _check_store(store)
    host = {k: (v.detach().to("cpu") if isinstance(v, torch.Tensor) else v) for k, v in state_dict.items()}
    if store == "hash":
        from replay.store.weights import serialize_state_dict

        rec.weights(version=int(version), step=step, sha256=hashlib.sha256(serialize_state_dict(host)).hexdigest())
    else:
        rec.weights(version=int(version), step=step, state_dict=host, delta=store == "delta")


# ------------------------------------------------------------------ AsyncLLM

# Pass as AsyncEngineArgs(worker_extension_cls=WORKER_EXTENSION): RecordedAsyncLLM.update_weights
# then loads a state dict into the workers by method name (no pickled function on the wire).
WORKER_EXTENSION = "replay.integrations.vllm.ReplayWorkerExtension"


class ReplayWorkerExtension:
    """Methods vLLM adds to its workers (``worker_extension_cls``), called by name through
    ``collective_rpc``."""

    def replay_load_weights(self, path: str) -> int:
        """Load the safetensors file ``path`` (HF names and shapes) into the running model."""
        from safetensors.torch import load_file

        from replay.engines.vllm.args import rpc_load_weights

        return rpc_load_weights(self, list(load_file(path).items()))


class RecordedAsyncLLM:
    """A vLLM ``AsyncLLM`` with the recorder attached (see :func:`attach_async`): requests
    run concurrently and weight updates land while they are in flight, as in PipelineRL.

    Each token's version is the one vLLM stamps on it (``CompletionOutput.weight_versions``,
    which :meth:`update_weights` sets between two engine steps); each request is recorded
    when it finishes, in the order it was submitted. A replay finds from those versions
    where each update landed and when each request joined the running batch."""

    def __init__(self, engine: Any, rec: Any, *, weight_update: str = "paused", version: int = 0,
                 engine_info: EngineInfo | None = None):
        self.engine, self.rec, self.version = engine, rec, int(version)
        self.weight_update = weight_update
        self.info = engine_info or describe_llm(engine, weight_update=weight_update)
        self._generating: int | None = None   # the step whose requests are in flight

    def step(self, step: int):
        """``with run.step(k):`` marks step ``k``'s start and end (at the serving version)."""
        return self.rec.step(step, weight_version=self.version)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *, step: int,
                       reward: Any = None, group_id: str | None = None, on_output: Any = None,
                       **kw: Any) -> Any:
        """``AsyncLLM.generate(prompt, sampling_params, request_id)`` run to its end and
        recorded; returns the final ``RequestOutput``. ``reward``: a float (or a list of n),
        or a function of a completion's token ids; ``on_output``: called with each output
        streamed on the way."""
        kind = getattr(getattr(sampling_params, "output_kind", None), "name", "CUMULATIVE")
        if kind == "DELTA":
            raise BadInput("output_kind=DELTA streams pieces of each completion; record with the default "
                           "(CUMULATIVE) or FINAL_ONLY", field="output_kind", step=step, request_id=request_id)
        n = int(getattr(sampling_params, "n", 1) or 1)
        rids = [str(request_id)] if n == 1 else [f"{request_id}:{i}" for i in range(n)]
        for rid in rids:
            self.rec.event("request_submitted", step=step, weight_version=self.version, request_id=rid)
        self._generating = step
        final, latest = None, {}
        async for out in self.engine.generate(prompt, sampling_params, request_id, **kw):
            final = out
            for c in out.outputs:   # with n > 1 an output holds the completions that just advanced
                latest[c.index] = c
            if on_output is not None:
                on_output(out)
        if final is None or len(latest) != n:
            raise BadInput(f"the engine returned {len(latest)} of {n} completions", field="request_id",
                           step=step, request_id=request_id)
        final.outputs = [latest[i] for i in sorted(latest)]
        if callable(reward):
            reward = [reward(list(c.token_ids)) for c in final.outputs]
        record_outputs(self.rec, [final], step=step, sampling_params=sampling_params, weight_version=None,
                       group_ids=None if group_id is None else [group_id], rewards=[reward], engine_info=self.info)
        return final

    async def update_weights(self, version: int, state_dict: Mapping[str, Any], *, step: int | None = None,
                             store: str = "delta", load: Any = None) -> None:
        """Load ``state_dict`` as ``version`` while requests may be in flight, and record it.

        vLLM's pause (``pause_generation(mode="keep", clear_cache=False)``) holds the
        running requests between two engine steps; the weights load, vLLM's weight version
        is set (every later token carries it), and generation resumes. ``load``: your own
        coroutine function that loads the weights into the workers (NCCL, shared memory...);
        without it the state dict goes through a temporary file and the engine needs
        ``worker_extension_cls=WORKER_EXTENSION``. ``step``: the step whose requests are in
        flight (default: the last one :meth:`generate` ran); the update goes into that step's
        plan only, so a replay is exact when one step's requests are in flight at a time."""
        _check_store(store)
        step = self._generating if step is None else step
        if load is None and self.engine.vllm_config.parallel_config.worker_extension_cls != WORKER_EXTENSION:
            raise BadInput("the engine has no replay worker extension to load weights with; create it with "
                           "AsyncEngineArgs(worker_extension_cls=replay.integrations.vllm.WORKER_EXTENSION), "
                           "or pass load= your own coroutine function", field="load", step=step)
        # after_step null: the engine step it lands at is not counted here; the replay takes it
        # from the tokens' versions
        self.rec.event("weights_update_start", step=step, weight_version=int(version), mode=self.weight_update,
                       after_step=None)
        with contextlib.ExitStack() as stack:
            if load is None:   # the file is written before the pause: generation waits only for the load
                path = stack.enter_context(_weights_file(state_dict))

                async def load() -> None:
                    await self.engine.collective_rpc("replay_load_weights", args=(path,))

            await self.engine.pause_generation(mode="keep", clear_cache=False)
            try:
                await load()
                await self.engine.update_weight_version(str(int(version)))
            finally:
                await self.engine.resume_generation()
        self.version = int(version)
        _store_weights(self.rec, self.version, state_dict, step=step, store=store)
        self.rec.event("weights_update_end", step=step, weight_version=self.version, mode=self.weight_update)

    def close(self, error: BaseException | None = None) -> None:
        self.rec.close(error=error)


@contextlib.contextmanager
def _weights_file(state_dict: Mapping[str, Any]) -> Iterator[str]:
    """``state_dict`` as a temporary safetensors file (removed afterwards), for the workers to load."""
    import tempfile
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="replay-weights-") as tmp:
        path = str(Path(tmp) / "weights.safetensors")
        save_file({k: torch.as_tensor(v).detach().to("cpu").contiguous() for k, v in state_dict.items()}, path)
        yield path


async def attach_async(engine: Any, path: Any, *, weight_update: str = "paused", run_config: dict | None = None,
                       model: bool | str = True, store_model_weights: bool = True,
                       **recorder_kw: Any) -> RecordedAsyncLLM:
    """:func:`attach` for an ``AsyncLLM``: the recorder, the engine config and checkpoint in
    it, and vLLM's weight version set to 0, so that every token says which weights made it."""
    if weight_update != "paused":
        raise BadInput("attach_async loads weights with vLLM's pause (weight_update='paused'): an update "
                       "without it cannot be placed between two engine steps from outside the engine; record "
                       "such a loop with record_outputs and your own weights_update_start events",
                       field="weight_update")
    rec, info = _open(engine, path, weight_update, run_config, model, store_model_weights, recorder_kw)
    await engine.update_weight_version("0")
    return RecordedAsyncLLM(engine, rec, weight_update=weight_update, engine_info=info)
