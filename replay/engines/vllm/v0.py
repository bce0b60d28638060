"""vLLM's V0 engine (vLLM ≤ 0.10 with ``VLLM_USE_V1=0``) behind the same protocol.

V0 and V1 cannot be installed side by side, so this class runs in a worker process
under another interpreter (``EngineClient(..., python="/venv-v0/bin/python")``).
What differs from :class:`~replay.engines.vllm.engine.VLLMEngine`:

- engine: ``vllm.LLMEngine.from_engine_args`` with ``VLLM_USE_V1=0``, stepped the same way;
- logprobs: V0's sampler returns logprobs after temperature / top-k / top-p, so only
  ``logprobs_mode="processed_logprobs"`` can be honoured (V0 has no ``logprobs_mode``);
- weight update: V0 has no pause API; loading between two ``step()`` calls is its
  blocking update (nothing runs while ``collective_rpc`` loads), so both modes do that;
- async scheduling does not exist in V0; ``async_scheduling=True`` is refused;
- scoring asks for raw prompt logprobs with temperature 1 and processes them in Python,
  exactly as the V1 class does, so it does not depend on how V0 treats prompt logprobs.
"""
from __future__ import annotations

import os
from typing import Any

from replay.errors import EngineError
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


class VLLMV0Engine(VLLMEngine):
    """vLLM V0 (≤ 0.10) as an :class:`~replay.engines.base.Engine`."""

    name = "vllm-v0"
    supports_forced_output = False

    def _engine_kwargs(self, dtype, device, max_model_len, seed, extra) -> dict[str, Any]:
        ok, why = v0_available()
        if not ok:
            raise EngineError(why)
        if self.config.logprobs_mode != "processed_logprobs":
            raise EngineError("vLLM V0 only returns processed logprobs; use logprobs_mode='processed_logprobs'")
        if self.config.async_scheduling:
            raise EngineError("vLLM V0 has no async scheduling; use async_scheduling=False")
        kw = super()._engine_kwargs(dtype, device, max_model_len, seed, extra)
        kw.pop("logprobs_mode", None)
        kw.pop("async_scheduling", None)
        kw.pop("kv_cache_memory_bytes", None)
        kw.pop("logits_processors", None)  # V0's per-request processors differ; no forcing there
        kw.setdefault("gpu_memory_utilization", 0.1)
        return kw

    def _create(self, kw: dict[str, Any]) -> Any:
        os.environ["VLLM_USE_V1"] = "0"
        from vllm import EngineArgs, LLMEngine

        return LLMEngine.from_engine_args(EngineArgs(**kw))

    def _effective(self) -> dict[str, Any]:
        import vllm

        e = self._engine
        return {
            "vllm_version": vllm.__version__,
            "device": str(e.device_config.device_type) if hasattr(e, "device_config") else "unknown",
            "logprobs_mode": "processed_logprobs",
            "enable_prefix_caching": bool(e.cache_config.enable_prefix_caching),
            "async_scheduling": False,
            "head_dtype": self._rpc(_rpc_head_dtype_v0)[0],
            "dtype": str(e.model_config.dtype).replace("torch.", ""),
            "block_size": e.cache_config.block_size,
            "vocab_size": e.model_config.get_vocab_size(),
        }

    @property
    def _core(self) -> Any:
        raise EngineError("vLLM V0 has no engine core to pause")

    def _rpc(self, fn: Any, *args: Any) -> list[Any]:
        return self._engine.model_executor.collective_rpc(fn, args=args)

    def _abort(self, tag: str) -> None:
        # V0 keeps the ids it was given; its scheduler lists the waiting and running groups.
        queued = [g.request_id for sched in self._engine.scheduler for queue in (sched.waiting, sched.running)
                  for g in queue if g.request_id.startswith(tag)]
        if queued:
            self._engine.abort_request(queued)

    def _pause(self) -> bool:
        return False  # V0's update between steps is already blocking

    def _resume(self) -> None:
        return None


def _rpc_head_dtype_v0(worker: Any) -> str:
    model = worker.model_runner.model
    head = getattr(getattr(model, "logits_processor", None), "head_dtype", None)
    return str(head).replace("torch.", "") if head is not None else "model"
