"""Sampled logprob, entropy and top-k of a logits tensor without a full fp32 log-softmax.

A trainer's logprob pass produces logits ``[T, V]`` (bf16 or fp32, often on a GPU)
for ``T`` tokens over a vocabulary of ``V``. What a recording needs from them is
small: the logprob of each sampled token, the entropy of each distribution and the
top-k. The naive way, ``log_softmax(logits.float())``, materialises ``T × V`` fp32
values (5 GB for 8192 × 151936) and reads them three more times.

:func:`capture_logits` reads the logits once instead:

* on CUDA with Triton available, a kernel (``replay.trainer.capture_triton``) streams each
  row through an online softmax (running max ``m``, ``Σ e^(x-m)`` and
  ``Σ (x-m)·e^(x-m)``), reads the sampled logit, and writes the maximum of each block
  of 128 logits; the top-k then lies in the k best blocks (proof in that module),
  so only ``k × 128`` logits per row are read again to select it;
* elsewhere, a chunked torch path does the same over vocabulary chunks with a
  running top-k merge.

Both give, within fp32 rounding, what the naive path gives. Ties in the top-k go
to the lower token id, on every path (the naive reference uses a stable sort).

:class:`CaptureSink` moves captures to the host without stalling the training
step: pinned ring buffers, copies on a side stream, a CUDA event per slot, and a
background thread that hands finished slots to a :class:`~replay.Recorder`.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from replay.errors import BadInput
from replay.trainer.captured import Capture, ids_of_keys, order_keys

if TYPE_CHECKING:
    import torch

DEFAULT_K = 20         # top-k width recorded by default
DEFAULT_CHUNK = 16384  # vocabulary chunk of the torch path (columns per step)
_FLT_MIN = -3.4028234663852886e38  # lowest finite float32


# ------------------------------------------------------------------------------ checks

def _check(logits: Any, token_ids: Any, k: int, temperature: float) -> None:
    import torch

    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise BadInput(f"logits must be a 2-D torch tensor [T, V], got "
                       f"{getattr(logits, 'shape', type(logits).__name__)}", field="logits")
    if not logits.is_floating_point():
        raise BadInput(f"logits must be floating point, got {logits.dtype}", field="logits")
    if not isinstance(token_ids, torch.Tensor) or token_ids.shape != logits.shape[:1]:
        raise BadInput(f"token_ids must be a tensor of shape [{logits.shape[0]}], got "
                       f"{getattr(token_ids, 'shape', type(token_ids).__name__)}", field="token_ids")
    if not 0 <= k <= logits.shape[1]:
        raise BadInput(f"k must lie in [0, {logits.shape[1]}] (the vocabulary), got {k}", field="k")
    if not temperature > 0:
        raise BadInput(f"temperature must be > 0, got {temperature}", field="temperature")
    if token_ids.numel() and not (token_ids.is_cuda and triton_available(token_ids.device)):
        # (on the Triton path the kernel masks out-of-range ids to NaN instead: no device sync)
        lo, hi = int(token_ids.min()), int(token_ids.max())
        if lo < 0 or hi >= logits.shape[1]:
            raise BadInput(f"token id {lo if lo < 0 else hi} lies outside the vocabulary "
                           f"[0, {logits.shape[1]})", field="token_ids")


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        import logging

        logging.getLogger("replay.trainer.capture").warning(msg)


def triton_available(device: Any) -> bool:
    """True when the Triton kernel can run on ``device`` (CUDA and an importable triton)."""
    if os.environ.get("REPLAY_CAPTURE_BACKEND", "") == "torch":
        return False
    if getattr(device, "type", str(device)) != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- capture

def capture_logits(logits: Any, token_ids: Any, *, k: int = DEFAULT_K, temperature: float = 1.0,
                   chunk: int = DEFAULT_CHUNK, backend: str = "auto") -> Capture:
    """Sampled logprob, entropy and top-k of each row of ``logits`` ``[T, V]``.

    ``token_ids[t]`` is the token sampled from row ``t``. Logprobs are of
    ``logits / temperature`` (the processed distribution a trainer means). ``backend``:
    ``"auto"`` (Triton on CUDA when importable, else torch), ``"triton"`` or ``"torch"``.
    Results stay on the logits' device.
    """
    import torch

    _check(logits, token_ids, k, temperature)
    auto = backend == "auto"
    if auto:
        backend = "triton" if triton_available(logits.device) else "torch"
    if backend == "triton":
        try:
            from replay.trainer.capture_triton import capture_triton

            return capture_triton(logits, token_ids, k=k, temperature=temperature)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot build here must not stop training
            if not auto:
                raise
            _warn_once(f"capture: Triton kernel unavailable ({type(e).__name__}: {e}); using the torch path")
            backend = "torch"
    if backend != "torch":
        raise BadInput(f"backend must be auto, triton or torch, not {backend!r}", field="backend")
    with torch.no_grad():
        return _capture_torch(logits, token_ids, k=k, temperature=float(temperature), chunk=int(chunk))


def _capture_torch(logits: Any, token_ids: Any, *, k: int, temperature: float, chunk: int) -> Capture:
    import torch

    T, V = logits.shape
    dev = logits.device
    inv_t = 1.0 / temperature
    m = torch.full((T,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(T, dtype=torch.float32, device=dev)   # Σ e^(x - m)
    w = torch.zeros(T, dtype=torch.float32, device=dev)   # Σ (x - m) e^(x - m): small, well conditioned
    best = torch.empty((T, 0), dtype=torch.int64, device=dev)  # running top-k order keys
    chunk = max(1, chunk)
    for lo in range(0, V, chunk):
        raw = logits[:, lo:lo + chunk].float()
        x = raw * inv_t if temperature != 1.0 else raw
        m_new = torch.maximum(m, x.max(dim=1).values)
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        scale = torch.exp(m - safe)
        # re-centre the old sum on the new max: Σ (x - m') e = Σ (x - m) e + (m - m') s
        shift = torch.where(s > 0, (m - safe) * s, torch.zeros_like(s))
        d = x - safe[:, None]
        e = torch.exp(d)
        s = s * scale + e.sum(dim=1)
        if bool(torch.isneginf(d).any()):  # -inf logits: their term is 0 * -inf; make it 0
            d = d.clamp(min=_FLT_MIN)
        w = (w + shift) * scale + (d * e).sum(dim=1)
        m = m_new
        if k:
            cand = torch.cat([best, _chunk_topk_keys(raw, lo, min(k, raw.shape[1]))], dim=1)
            best = cand.topk(min(k, cand.shape[1]), dim=1).values
    lse = m + torch.log(s)
    sampled = logits.gather(1, token_ids.long()[:, None])[:, 0].float() * inv_t
    logprobs = sampled - lse
    entropy = torch.log(s) - w / s
    topk_ids = ids_of_keys(best)
    topk_logprobs = logits.gather(1, topk_ids).float() * inv_t - lse[:, None]
    return Capture(logprobs, entropy, topk_ids, topk_logprobs)


def _chunk_topk_keys(raw: Any, lo: int, k: int) -> Any:
    """Order keys of the top ``k`` of each row of ``raw`` (columns ``lo..``), ties to the lower id.

    A float ``topk`` finds the k-th value ``thr``; every value above it is in, and of the
    values equal to it, the first ones (lowest ids) fill the remaining places. Only the
    ``[T, k]`` winners get int64 keys, so the chunk costs about one float ``topk``.
    """
    thr = raw.topk(k, dim=1).values[:, -1:]
    take = raw >= thr
    extra = take.sum(dim=1) > k  # rows where values tied with thr compete for the last places
    if bool(extra.any()):
        rows = extra.nonzero()[:, 0]
        sub, t = raw[rows], thr[rows]
        above = sub > t
        tied = sub == t
        need = k - above.sum(dim=1, keepdim=True)
        take[rows] = above | (tied & (tied.cumsum(dim=1) <= need))
    cols = take.nonzero()[:, 1].reshape(raw.shape[0], k)
    return order_keys(raw.gather(1, cols), cols + lo)


def capture_naive(logits: Any, token_ids: Any, *, k: int = DEFAULT_K, temperature: float = 1.0) -> Capture:
    """The reference: a full fp32 ``log_softmax``, gather, entropy and a stable sort for top-k."""
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(logits.float() / temperature, dim=-1)
        logprobs = lp.gather(1, token_ids.long()[:, None])[:, 0]
        entropy = -(lp.exp() * torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))).sum(-1)
        vals, ids = torch.sort(lp, dim=1, descending=True, stable=True)
        return Capture(logprobs, entropy, ids[:, :k], vals[:, :k])


# ------------------------------------------------------------------------------- sink

@dataclass
class _Job:
    """One submitted capture on its way to the recorder."""

    host: Capture | None      # host tensors (pinned slot views on CUDA)
    event: Any                # CUDA event recorded after the copies, or None on CPU
    slot: int                 # ring slot to release, or -1
    step: int                 # training step
    request_ids: list[str]    # one per sequence, in the capture's row order
    lengths: list[int]        # rows of each sequence, in order
    weight_version: Any       # int, or one int per sequence
    advantages: Any           # None, or one float per sequence
    source: str               # topk source ("trainer")
    record_topk: bool         # write topk rows


class CaptureSink:
    """Hands captures to a recorder off the training thread.

    ``submit()`` queues device→host copies of a :class:`Capture` on a side CUDA stream
    into pinned ring buffers (``slots`` of them) and returns at once; a background
    thread waits for each slot's event, splits rows into sequences and calls
    ``rec.trainer(...)`` and ``rec.topk(...)``. When every slot is in flight, ``submit``
    waits for the oldest (back-pressure, bounded host memory). On CPU the same thread
    does the recording, so the API and results are the same. ``flush()`` waits until
    everything submitted is recorded; errors of the thread surface there.
    """

    def __init__(self, rec: Any, *, slots: int = 3, record_topk: bool = True, source: str = "trainer"):
        if slots < 1:
            raise BadInput(f"slots must be >= 1, got {slots}", field="slots")
        self.rec = rec
        self.record_topk = record_topk
        self.source = source
        self._free: "queue.Queue[int]" = queue.Queue()
        for i in range(slots):
            self._free.put(i)
        self._buffers: list[Capture | None] = [None] * slots
        self._jobs: "queue.Queue[_Job | None]" = queue.Queue()
        self._error: BaseException | None = None
        self._stream: torch.cuda.Stream | None = None  # the copy stream, made on the first CUDA capture
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="replay-capture-sink", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- producer side

    def submit(self, capture: Capture, *, step: int, request_ids: Sequence[str], lengths: Sequence[int],
               weight_version: Any = None, advantages: Sequence[float] | None = None) -> None:
        """Queue ``capture`` (rows of sequences ``request_ids``, ``lengths[i]`` rows each)."""
        self._raise_pending()
        if self._closed:
            raise BadInput("this CaptureSink is closed", field="sink")
        lengths = [int(n) for n in lengths]
        if len(lengths) != len(request_ids):
            raise BadInput(f"{len(request_ids)} request_ids but {len(lengths)} lengths", field="lengths",
                           step=step)
        if sum(lengths) != capture.logprobs.shape[0]:
            raise BadInput(f"lengths sum to {sum(lengths)} but the capture has {capture.logprobs.shape[0]} "
                           "rows", field="lengths", step=step)
        job = _Job(None, None, -1, int(step), [str(r) for r in request_ids], lengths, weight_version,
                   None if advantages is None else [float(a) for a in advantages], self.source,
                   self.record_topk)
        if capture.logprobs.device.type == "cuda":
            self._copy_async(capture, job)
        else:
            job.host = capture
        self._jobs.put(job)

    def _copy_async(self, capture: Capture, job: _Job) -> None:
        import torch

        slot = self._free.get()  # back-pressure: waits while every slot is in flight
        fields = (capture.logprobs, capture.entropy, capture.topk_ids, capture.topk_logprobs)
        buf = self._buffers[slot]
        if buf is None or any(b.shape[0] < f.shape[0] or b.shape[1:] != f.shape[1:] or b.dtype != f.dtype
                              for b, f in zip(_fields(buf), fields)):
            n = max(f.shape[0] for f in fields)
            buf = Capture(*(torch.empty((max(n, 1), *f.shape[1:]), dtype=f.dtype, pin_memory=True)
                            for f in fields))
            self._buffers[slot] = buf
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=capture.logprobs.device)
        self._stream.wait_stream(torch.cuda.current_stream(capture.logprobs.device))
        views = []
        with torch.cuda.stream(self._stream):
            for b, f in zip(_fields(buf), fields):
                view = b[:f.shape[0]]
                view.copy_(f, non_blocking=True)
                f.record_stream(self._stream)  # keep the device memory alive until the copy ends
                views.append(view)
            event = torch.cuda.Event()
            event.record(self._stream)
        job.host, job.event, job.slot = Capture(*views), event, slot

    # -------------------------------------------------------------- consumer side

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    if job.event is not None:
                        job.event.synchronize()
                    self._record(job)
            except BaseException as e:  # surfaced to the producer at its next call
                self._error = e
            finally:
                if job is not None and job.slot >= 0:
                    self._free.put(job.slot)
                self._jobs.task_done()

    def _record(self, job: _Job) -> None:
        host = job.host
        assert host is not None  # submit() sets it before it queues the job
        lp = host.logprobs.numpy()
        ent = host.entropy.numpy()
        ids = host.topk_ids.numpy()
        tlp = host.topk_logprobs.numpy()
        versions = job.weight_version
        start = 0
        for i, (rid, n) in enumerate(zip(job.request_ids, job.lengths)):
            end = start + n
            version = versions[i] if isinstance(versions, (list, tuple)) else versions
            self.rec.trainer(step=job.step, request_id=rid, weight_version=version,
                             logprobs=lp[start:end].copy(), entropy=ent[start:end].copy(),
                             advantage=None if job.advantages is None else job.advantages[i])
            if job.record_topk and ids.shape[1] and n:
                self.rec.topk(step=job.step, request_id=rid, source=job.source,
                              ids=ids[start:end].copy(), logprobs=tlp[start:end].copy())
            start = end

    # ---------------------------------------------------------------------- control

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def flush(self) -> None:
        """Wait until every submitted capture is recorded; re-raise a background error."""
        self._jobs.join()
        self._raise_pending()

    def close(self) -> None:
        """Flush and stop the background thread; safe to call twice."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._jobs.put(None)
            self._thread.join()

    def __enter__(self) -> "CaptureSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fields(c: Capture) -> tuple:
    return (c.logprobs, c.entropy, c.topk_ids, c.topk_logprobs)
