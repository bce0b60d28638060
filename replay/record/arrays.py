"""Values the recorder is handed, as numpy arrays: copies on the caller's thread, conversion
and dtype checks on the writer's.

* :func:`snapshot` runs on the caller's thread. It copies what the caller may reuse
  (a list, a numpy array, a torch tensor): a list of numbers becomes a numpy array
  (``np.array``: the copy and the conversion in one pass over the Python objects, so
  the writer thread needs the GIL only briefly; measured cheaper end to end than
  copying the list and converting a whole batch with ``pa.array`` in the writer), a
  list it cannot convert is copied as is for validation to reject, a numpy array is
  copied, a CPU tensor is copied into a new numpy array (bfloat16 widened to
  float32). A CUDA tensor is copied into a pinned host buffer with
  ``non_blocking=True`` on the tensor's current stream and a CUDA event is recorded
  after the copy; the writer thread waits on that event, so the caller never
  synchronises the device.
* :func:`flat_column` runs on the writer thread. It turns one list column of a batch
  (one value per row) into a flat numpy array plus per-row lengths with one
  ``np.concatenate``, and Arrow list arrays are built from flat values + offsets
  (:func:`list_array`), so no per-element Python work happens there. A value that
  cannot be converted fails only its own row.

torch is imported only when a value is a torch tensor (``type(x).__module__``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

# What a list column holds: the numpy dtype it is stored with, and whether its values
# must be integers (ids, versions) or may be any real number (logprobs, entropy).
KINDS: dict[str, tuple[np.dtype, bool]] = {
    "int32": (np.dtype(np.int32), True),
    "int64": (np.dtype(np.int64), True),
    "float32": (np.dtype(np.float32), False),
}
_INT_LIMITS = {k: (int(np.iinfo(d).min), int(np.iinfo(d).max)) for k, (d, integral) in KINDS.items() if integral}


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


# numpy dtype a CPU tensor is copied into (bfloat16, which numpy lacks, widens to float32)
_NUMPY_OF_TORCH = {"torch.float32": np.float32, "torch.float64": np.float64, "torch.float16": np.float16,
                   "torch.bfloat16": np.float32, "torch.int64": np.int64, "torch.int32": np.int32,
                   "torch.int16": np.int16, "torch.int8": np.int8, "torch.uint8": np.uint8, "torch.bool": np.bool_}


@dataclass
class HostCopy:
    """A device-to-host copy in flight: ``buf`` is valid once ``event`` has completed."""

    buf: Any     # pinned CPU torch tensor receiving the copy
    event: Any   # torch.cuda.Event recorded on the source stream after the copy

    def wait(self) -> Any:
        self.event.synchronize()
        return self.buf


def _torch_snapshot(x: Any) -> Any:
    import torch

    t = x.detach()
    if t.device.type == "cpu":  # straight into a numpy array of our own: the copy, and no more work
        dtype = _NUMPY_OF_TORCH.get(str(t.dtype))
        if dtype is None:  # a dtype numpy lacks: validation names it
            return t.clone()
        out = np.empty(tuple(t.shape), dtype)
        torch.from_numpy(out).copy_(t)  # out owns its memory: no tensor stays alive (or GC-tracked)
        return out
    if t.device.type != "cuda":
        return t.to("cpu")  # other devices (mps, xpu): a blocking copy is all torch offers
    with torch.cuda.device(t.device):
        stream = torch.cuda.current_stream(t.device)
        buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        buf.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return HostCopy(buf, event)


def snapshot(x: Any) -> Any:
    """A copy of ``x`` the caller may not change any more; cheap, never raises for odd types.

    Values of types the recorder does not know pass through untouched, so that
    validation (not the caller's call) decides what to do with them.
    """
    if type(x) is list or type(x) is tuple:
        # One pass over the Python objects, here: the copy the caller needs is also the
        # conversion the writer needs, and the writer thread then holds the GIL only briefly.
        try:
            arr = np.array(x)
        except (ValueError, TypeError, OverflowError):  # ragged or odd: the writer names the problem
            arr = None
        if arr is not None and arr.dtype.kind in "iuf" and arr.ndim <= 2:
            return arr
        if x and isinstance(x[0], (list, tuple)):
            return list(map(list, x))  # 2-D (top-k): copy the rows too
        return list(x)
    if isinstance(x, np.ndarray):
        return x.copy()
    if is_torch(x):
        return _torch_snapshot(x)
    return x


def snapshot_scalar(x: Any) -> Any:
    """:func:`snapshot` for a value that is usually a Python number (kept as is, cheaply)."""
    if x is None or type(x) in (float, int):
        return x
    return snapshot(x)


def resolve(x: Any) -> Any:
    """Writer side: finish a :func:`snapshot` (wait for the device copy, torch -> numpy)."""
    if isinstance(x, HostCopy):
        x = x.wait()
    if is_torch(x):
        import torch

        if x.dtype == torch.bfloat16:
            return x.float().numpy()
        return x.numpy()
    return x


class ConversionError(ValueError):
    """One row's value could not be converted; ``reason`` says why."""


def dtype_fits(dtype: np.dtype, kind: str, empty: bool = False) -> bool:
    """Whether an array of ``dtype`` may be stored as ``kind`` (an empty float array may
    hold integers: ``np.array([])`` is float64)."""
    k = dtype.kind
    if KINDS[kind][1]:
        return k in "iu" or (k == "f" and empty)
    return k in "iuf"


def dtype_reason(arr: np.ndarray, kind: str) -> str | None:
    if dtype_fits(arr.dtype, kind, arr.size == 0):
        return None
    return f"dtype {arr.dtype} is {'not an integer dtype' if KINDS[kind][1] else 'not numeric'}"


def row_array(value: Any, kind: str, ndim: int = 1) -> np.ndarray:
    """One row's value as a numpy array of ``kind``'s dtype; :class:`ConversionError` if it cannot be."""
    value = resolve(value)
    if isinstance(value, np.ndarray):
        arr = value
        reason = dtype_reason(arr, kind)
        if reason:
            raise ConversionError(reason)
    elif isinstance(value, (list, tuple)):
        try:
            arr = np.array(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise ConversionError(f"not a numeric sequence: {e}") from None
        reason = dtype_reason(arr, kind)
        if reason:
            raise ConversionError(reason.replace("dtype object", "a value that is not a number")
                                  if arr.dtype.kind == "O" else reason)
    else:
        raise ConversionError(f"expected a list, numpy array or torch tensor, got {type(value).__name__}")
    if arr.ndim != ndim:
        raise ConversionError(f"expected {ndim}-D values, got shape {arr.shape}")
    return checked_cast(arr, kind)


def checked_cast(arr: np.ndarray, kind: str) -> np.ndarray:
    """Cast to ``kind``'s dtype, refusing integers the cast would change (2**40 -> int32)."""
    dtype, integral = KINDS[kind]
    if integral and arr.size and arr.dtype != dtype:
        lo, hi = _INT_LIMITS[kind]
        if int(arr.min()) < lo or int(arr.max()) > hi:
            raise ConversionError(f"value out of range for {dtype}")
    return arr.astype(dtype, copy=False)


def flat_column(values: list[Any], kind: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(flat values, length per row, {row index: reason}) for one list column of a batch.

    Rows that fail get length 0 and a reason. When every row is a 1-D array of a
    fitting dtype (the usual case: :func:`snapshot` turns lists into arrays) the
    column is one ``np.concatenate`` and one vectorised range check.
    """
    dtype = KINDS[kind][0]
    if set(map(type, values)) != {np.ndarray}:
        values = [resolve(v) for v in values]
    if values and set(map(type, values)) == {np.ndarray} and all(
            nd == 1 and dtype_fits(dt, kind) for dt, nd in {(v.dtype, v.ndim) for v in values}):
        try:
            flat = np.concatenate(values) if len(values) > 1 else values[0]
            lengths = np.fromiter(map(len, values), np.int64, len(values))
            return checked_cast(flat, kind), lengths, {}
        except ConversionError:
            pass  # one row is out of range: find it below
    parts, lengths, bad = [], np.zeros(len(values), np.int64), {}
    for i, v in enumerate(values):
        try:
            a = row_array(v, kind)
        except ConversionError as e:
            bad[i] = str(e)
            continue
        parts.append(a)
        lengths[i] = len(a)
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return flat.astype(dtype, copy=False), lengths, bad


def list_array(flat: np.ndarray, lengths: np.ndarray, mask: pa.Array | None = None) -> pa.ListArray:
    """An Arrow list array from flat values and per-row lengths (no per-element Python work)."""
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=mask)


def topk_arrays(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [n,k] int32, logprobs [n,k] float32, positions [n] int32) of one top-k call."""
    ids = field_array(row.get("ids"), "int32", 2, "ids")
    lps = field_array(row.get("logprobs"), "float32", 2, "logprobs")
    pos = row.get("positions")
    pos = np.arange(ids.shape[0], dtype=np.int32) if pos is None else field_array(pos, "int32", 1, "positions")
    return ids, lps, pos


def field_array(value: Any, kind: str, ndim: int, field: str) -> np.ndarray:
    try:
        return row_array(value, kind, ndim)
    except ConversionError as e:
        raise ConversionError(f"{field}: {e}") from None
