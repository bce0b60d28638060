"""How an :class:`~replay.fixes.EngineConfig` becomes real vLLM engine arguments,
and the functions vLLM runs inside its worker through ``collective_rpc``.

Mapping (one real knob per field, DESIGN §1):

===================== ===================================================================
EngineConfig field    vLLM knob
===================== ===================================================================
logprobs_mode         ``EngineArgs(logprobs_mode=...)`` ("raw_logprobs" / "processed_logprobs")
enable_prefix_caching ``EngineArgs(enable_prefix_caching=...)``
async_scheduling      ``EngineArgs(async_scheduling=...)``. vLLM's CPU platform forces it off
                      (``platforms/cpu.py``: "async scheduling is not required on CPU"); the
                      engine reports the effective value in ``effective["async_scheduling"]``
lm_head_dtype         ``EngineArgs(hf_overrides={"head_dtype": ...})`` when it differs from the
                      model dtype (vLLM's default head dtype is the model dtype)
dtype                 ``EngineArgs(dtype=...)``
weight_update         not an engine argument: chosen per update in ``VLLMEngine`` (paused =
                      ``pause_scheduler(mode="keep", clear_cache=False)`` → load →
                      ``resume_scheduler()``; concurrent = load between steps, no pause)
===================== ===================================================================
"""
from __future__ import annotations

import gc
import os
from typing import Any

from replay.errors import EngineError
from replay.fixes import EngineConfig

# Keep the engine core in this process: LLMEngine.step() then runs the scheduler and
# the model directly, so weight updates land exactly between two steps.
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def platform_device() -> str:
    """The device type of the installed vLLM build ("cpu", "cuda", ...)."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


DEFAULT_MAX_MODEL_LEN = 512  # a replay's context when none is recorded (KV memory stays small on CPU)


def default_max_model_len(model_path: str) -> int:
    """:data:`DEFAULT_MAX_MODEL_LEN`, or the model's own limit (``max_position_embeddings``) when
    smaller: vLLM refuses a max_model_len above it."""
    import json
    from pathlib import Path

    try:
        limit = json.loads((Path(model_path) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        limit = None
    return min(DEFAULT_MAX_MODEL_LEN, limit) if isinstance(limit, int) and limit > 0 else DEFAULT_MAX_MODEL_LEN


def engine_kwargs(model_path: str, config: EngineConfig, *, dtype: str | None, device: str,
                  max_model_len: int, seed: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.EngineArgs`` that realise ``config``, common to V1 and
    V0 (each backend adds its own: V1's logprobs mode, async scheduling, KV size, forcing).

    ``device`` is "auto" (whatever the installed vLLM build runs on) or a device type
    that must equal it: vLLM 0.32 picks the device from the build, not from an argument.
    """
    have = platform_device()
    if device not in ("auto", have):
        raise EngineError(f"device={device!r} requested but the installed vLLM build runs on {have!r}; "
                          "pass device='auto' or install the matching vLLM build")
    kw: dict[str, Any] = {
        "model": str(model_path),
        "dtype": dtype or config.dtype,
        "seed": seed,
        "max_model_len": max_model_len,
        "enable_prefix_caching": config.enable_prefix_caching,
        # Full-vocabulary prompt logprobs are how processed scoring stays exact.
        "max_logprobs": -1,
        # No graph capture or compilation: start-up in seconds, same kernels every step.
        "enforce_eager": True,
        "disable_log_stats": True,
    }
    if have != "cpu":
        # Share of GPU memory vLLM reserves; its default 0.92 would starve a trainer
        # sharing the GPU.
        kw["gpu_memory_utilization"] = 0.5
    if config.lm_head_dtype != kw["dtype"]:
        # vLLM runs the head in the model dtype unless told otherwise (both directions:
        # an fp32 head on a bf16 model is the fix, a bf16 head on an fp32 model the V1 default).
        kw["hf_overrides"] = {"head_dtype": config.lm_head_dtype}
    return kw


def apply_env() -> None:
    """Set the environment vLLM reads at engine creation (in-process engine core)."""
    os.environ.update(IN_PROCESS_ENV)


# In-process engines share vLLM's process-wide distributed state (its model-parallel
# groups): a full shutdown tears that down under every other live engine, so only the
# last engine alive in the process does it.
LIVE: set[int] = set()


def release_engine(engine: Any) -> None:
    """Shut one in-process vLLM engine down (runs once, from close() or at collection)."""
    LIVE.discard(id(engine))
    client = getattr(engine, "engine_core", None)
    if client is None:  # vLLM V0: the executor is the engine's only resource
        shutdown = getattr(getattr(engine, "model_executor", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        return
    core = getattr(client, "engine_core", None)
    finalizer = getattr(client, "_finalizer", None)
    if LIVE and core is not None and finalizer is not None:
        finalizer.detach()
        core.scheduler.shutdown()
        core.model_executor.shutdown()
        gc.unfreeze()
    else:
        client.shutdown()


# ------------------------------------------------------------- collective_rpc targets
# vLLM calls these as fn(worker, *args) in each worker; with the in-process engine
# core the tensors are passed by reference, with worker processes they are pickled.


def rpc_load_weights(worker: Any, weights: list[tuple[str, Any]]) -> int:
    """Load HF-named, HF-shaped tensors into the running model; returns how many.

    The tensors go through ``worker.model_runner.model.load_weights(weights=...)``. Since
    vLLM packs linear weights into kernel layouts after loading (on CPU each linear
    weight becomes an empty parameter beside a packed buffer, which has no
    ``weight_loader``), the call is wrapped in vLLM's in-place layer-wise reload
    (``initialize_layerwise_reload`` → ``load_weights`` → ``finalize_layerwise_reload``,
    the steps of ``Worker.reload_weights``), which restores the loaders and repacks each
    layer once its tensors have arrived. Older vLLM without that module loads directly.
    """
    model = worker.model_runner.model
    try:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import (finalize_layerwise_reload,
                                                             initialize_layerwise_reload)
    except ImportError:
        model.load_weights(weights=iter(weights))
        return len(weights)
    vllm_config = worker.model_runner.vllm_config
    with set_current_vllm_config(vllm_config):
        initialize_layerwise_reload(model)
        model.load_weights(weights=iter(weights))
        finalize_layerwise_reload(model, vllm_config.model_config)
    return len(weights)


def rpc_head_dtype(worker: Any) -> str:
    """dtype the lm_head projection runs in (the logits processor's head_dtype)."""
    model = worker.model_runner.model
    head = getattr(model.logits_processor, "head_dtype", None)
    return str(head).replace("torch.", "") if head is not None else "model"


def rpc_capture_layers(worker: Any, on: bool) -> list[Any] | None:
    """Install (``on``) or remove forward hooks on the running model that keep the residual
    stream after the embeddings and after each decoder layer; removing returns the kept
    states as float32 numpy arrays ``[tokens, hidden]``, one per point, the forwards in
    between concatenated. A vLLM decoder layer returns ``(hidden_states, residual)`` with
    the residual add deferred into the next fused add-RMSNorm (which works in place), so
    each hook adds the two at once and keeps a copy. Needs an eager model (no graph)."""
    import torch

    model = worker.model_runner.model
    inner = getattr(model, "model", model)
    if on:
        points: list[list[Any]] = [[] for _ in range(1 + len(inner.layers))]

        def keep(i: int, out: Any) -> None:
            if isinstance(out, tuple):
                out = out[0] if len(out) < 2 or out[1] is None else out[0] + out[1]
            points[i].append(out.detach().float().cpu().clone())

        hooks = [inner.embed_tokens.register_forward_hook(lambda m, a, out: keep(0, out))]
        hooks += [layer.register_forward_hook(lambda m, a, out, j=j: keep(j + 1, out))
                  for j, layer in enumerate(inner.layers)]
        worker._replay_capture = (hooks, points)
        return None
    hooks, points = getattr(worker, "_replay_capture", ([], []))
    for h in hooks:
        h.remove()
    worker._replay_capture = ((), [])
    return [torch.cat(p, 0).numpy() if p else None for p in points]

