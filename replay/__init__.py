"""replay: record, query, replay and bisect RL training runs on vLLM.

``from replay import Recorder, open_recording``. Importing this package loads
pyarrow and numpy only: torch, vllm, transformers and textual load inside the
functions that need them, so a trainer pays nothing for the import.
"""
from __future__ import annotations

from replay.errors import BadInput, EngineError, RecordingError, ReplayError
from replay.schema import SCHEMA_VERSION

__version__ = "0.1.0"

__all__ = ["Recorder", "open_recording", "ReplayError", "BadInput", "RecordingError", "EngineError",
           "SCHEMA_VERSION", "__version__"]


def __getattr__(name: str):
    # Loaded on first use so `import replay` stays cheap.
    if name == "Recorder":
        from replay.record.recorder import Recorder
        return Recorder
    if name == "open_recording":
        from replay.read.recording import open_recording
        return open_recording
    raise AttributeError(f"module 'replay' has no attribute {name!r}")
