"""vLLM V1 as a backend of :class:`~replay.engines.vllm.engine.VLLMEngine`: the engine it
builds (``vllm.v1.engine.llm_engine.LLMEngine``, engine core in this process) and how it
reaches that engine's worker, scheduler and queue.

Weight updates under ``weight_update="paused"`` call what
``AsyncLLM.pause_generation(mode="keep", clear_cache=False)`` / ``resume_generation()``
call on the engine core: ``EngineCore.pause_scheduler(mode="keep", clear_cache=False)``
and ``EngineCore.resume_scheduler()``.
"""
from __future__ import annotations

from typing import Any

from replay.errors import EngineError
from replay.fixes import EngineConfig
from replay.engines.vllm import args as va


class V1:
    """vLLM ≥ 0.11's engine (the only one those versions have)."""

    name = "vllm"
    # GenRequest.forced_output_ids: the recorded tokens go through the generation path
    # (batch, KV, prefix cache, weight updates) instead of samples; see forcing.py.
    supports_forced_output = True

    def engine_kwargs(self, model_path: str, config: EngineConfig, *, dtype: str | None, device: str,
                      max_model_len: int, seed: int) -> dict[str, Any]:
        kw = va.engine_kwargs(model_path, config, dtype=dtype, device=device, max_model_len=max_model_len,
                              seed=seed)
        kw["logprobs_mode"] = config.logprobs_mode
        kw["async_scheduling"] = config.async_scheduling
        if va.platform_device() == "cpu":
            # An explicit KV-cache size: vLLM's CPU worker otherwise sizes it as a share of
            # the NUMA node minus this process's RSS, which fails once a second engine (or a
            # trainer) lives in the same process.
            kw["kv_cache_memory_bytes"] = 256 * 2**20
        from replay.engines.vllm.forcing import processor_class

        kw["logits_processors"] = [processor_class()]
        return kw

    def create(self, kw: dict[str, Any]) -> Any:
        va.apply_env()
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        return LLMEngine.from_engine_args(EngineArgs(**kw))

    def effective(self, engine: Any) -> dict[str, Any]:
        import vllm

        vc = engine.vllm_config
        return {
            "vllm_version": vllm.__version__,
            "device": va.platform_device(),
            "logprobs_mode": vc.model_config.logprobs_mode,
            "enable_prefix_caching": bool(vc.cache_config.enable_prefix_caching),
            "async_scheduling": bool(vc.scheduler_config.async_scheduling),
            "head_dtype": self.rpc(engine, va.rpc_head_dtype)[0],
            "dtype": str(vc.model_config.dtype).replace("torch.", ""),
            "block_size": vc.cache_config.block_size,
            "max_model_len": vc.model_config.max_model_len,
            "vocab_size": vc.model_config.get_vocab_size(),
        }

    def rpc(self, engine: Any, fn: Any, *args: Any) -> list[Any]:
        return engine.collective_rpc(fn, args=args)

    @staticmethod
    def _core(engine: Any) -> Any:
        """The in-process ``EngineCore`` (the object ``AsyncLLM`` reaches through its client)."""
        core = getattr(engine.engine_core, "engine_core", None)
        if core is None:
            raise EngineError("the vLLM engine core is not in this process; the paused update needs "
                              "VLLM_ENABLE_V1_MULTIPROCESSING=0 at engine creation")
        return core

    def pause(self, engine: Any) -> bool:
        core = self._core(engine)
        core.pause_scheduler(mode="keep", clear_cache=False)
        return bool(core.is_scheduler_paused())

    def resume(self, engine: Any) -> None:
        self._core(engine).resume_scheduler()

    def abort(self, engine: Any, tag: str) -> None:
        """Withdraw every queued request of one call (V1 keys them by internal id: tag + id + suffix)."""
        queued = [rid for rid in engine.output_processor.request_states if rid.startswith(tag)]
        if queued:
            engine.abort_request(queued, internal=True)
