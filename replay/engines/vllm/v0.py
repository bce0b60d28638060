"""vLLM's V0 engine (vLLM ≤ 0.10 with ``VLLM_USE_V1=0``) as a backend of the one vLLM engine.

V0 and V1 cannot be installed side by side, so this backend runs in a worker process
under another interpreter (``EngineClient(..., python="/venv-v0/bin/python")``).
What differs from the V1 backend (:class:`~replay.engines.vllm.v1.V1`):

- engine: ``vllm.LLMEngine.from_engine_args`` with ``VLLM_USE_V1=0``, stepped the same way;
- logprobs: V0's sampler returns logprobs after temperature / top-k / top-p, so only
  ``logprobs_mode="processed_logprobs"`` can be honoured (V0 has no ``logprobs_mode``);
- weight update: V0 has no pause API; loading between two ``step()`` calls is its
  blocking update (nothing runs while ``collective_rpc`` loads), so both modes do that;
- async scheduling does not exist in V0; ``async_scheduling=True`` is refused;
- scoring asks for raw prompt logprobs with temperature 1 and processes them in Python,
  exactly as on V1, so it does not depend on how V0 treats prompt logprobs.
"""
from __future__ import annotations

import os
from typing import Any

from replay.errors import EngineError
from replay.fixes import EngineConfig
from replay.engines.vllm import args as va
from replay.engines.vllm.engine import VLLMEngine


def _version_tuple(text: str) -> tuple[int, int]:
    parts = (text.split("+")[0].split(".") + ["0", "0"])[:2]
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except ValueError:
        return (99, 0)


def v0_available() -> tuple[bool, str]:
    """Whether the installed vLLM has the V0 engine, and why not."""
    try:
        import vllm
    except ImportError as e:
        return False, f"vLLM is not installed: {e}"
    if _version_tuple(vllm.__version__) > (0, 10):
        return False, (f"installed vLLM {vllm.__version__} is V1-only (the V0 engine was removed after 0.10); "
                       "run VLLMV0Engine in a worker under a venv with vllm<=0.10")
    return True, ""


class V0:
    """vLLM V0 (≤ 0.10) as a backend of :class:`~replay.engines.vllm.engine.VLLMEngine`."""

    name = "vllm-v0"
    supports_forced_output = False  # V0's per-request logits processors differ: no forcing there

    def engine_kwargs(self, model_path: str, config: EngineConfig, *, dtype: str | None, device: str,
                      max_model_len: int, seed: int) -> dict[str, Any]:
        ok, why = v0_available()
        if not ok:
            raise EngineError(why)
        if config.logprobs_mode != "processed_logprobs":
            raise EngineError("vLLM V0 only returns processed logprobs; use logprobs_mode='processed_logprobs'")
        if config.async_scheduling:
            raise EngineError("vLLM V0 has no async scheduling; use async_scheduling=False")
        kw = va.engine_kwargs(model_path, config, dtype=dtype, device=device, max_model_len=max_model_len,
                              seed=seed)
        kw.setdefault("gpu_memory_utilization", 0.1)  # V0 has no kv_cache_memory_bytes
        return kw

    def create(self, kw: dict[str, Any]) -> Any:
        os.environ["VLLM_USE_V1"] = "0"
        from vllm import EngineArgs, LLMEngine

        return LLMEngine.from_engine_args(EngineArgs(**kw))

    def effective(self, engine: Any) -> dict[str, Any]:
        import vllm

        return {
            "vllm_version": vllm.__version__,
            "device": str(engine.device_config.device_type) if hasattr(engine, "device_config") else "unknown",
            "logprobs_mode": "processed_logprobs",
            "enable_prefix_caching": bool(engine.cache_config.enable_prefix_caching),
            "async_scheduling": False,
            "head_dtype": self.rpc(engine, _rpc_head_dtype_v0)[0],
            "dtype": str(engine.model_config.dtype).replace("torch.", ""),
            "block_size": engine.cache_config.block_size,
            "max_model_len": engine.model_config.max_model_len,
            "vocab_size": engine.model_config.get_vocab_size(),
        }

    def rpc(self, engine: Any, fn: Any, *args: Any) -> list[Any]:
        return engine.model_executor.collective_rpc(fn, args=args)

    def pause(self, engine: Any) -> bool:
        return False  # V0 has no pause API; its update between two steps is already blocking

    def resume(self, engine: Any) -> None:
        return None

    def abort(self, engine: Any, tag: str) -> None:
        # V0 keeps the ids it was given; its scheduler lists the waiting and running groups.
        queued = [g.request_id for sched in engine.scheduler for queue in (sched.waiting, sched.running)
                  for g in queue if g.request_id.startswith(tag)]
        if queued:
            engine.abort_request(queued)


def VLLMV0Engine(model_path: Any, config: EngineConfig | None = None, **kw: Any) -> VLLMEngine:  # noqa: N802
    """vLLM V0 as an :class:`~replay.engines.base.Engine`: the one vLLM engine class on the
    :class:`V0` backend."""
    return VLLMEngine(model_path, config, backend=V0(), **kw)


def _rpc_head_dtype_v0(worker: Any) -> str:
    model = worker.model_runner.model
    head = getattr(getattr(model, "logits_processor", None), "head_dtype", None)
    return str(head).replace("torch.", "") if head is not None else "model"
