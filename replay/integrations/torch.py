"""Record a PyTorch trainer's side of a run: its logprob pass and its weight versions.

::

    hook = TrainerHook(rec, k=20)
    # inside the trainer's logprob pass (PipelineRL-style padded [B, T] tensors):
    hook.record_batch(step=s, request_ids=ids, logits=logits, token_ids=labels, mask=out_mask,
                      weight_version=v, advantages=adv, temperature=0.7)
    hook.record_weights(v + 1, model, step=s, store="delta")
    hook.close()

Conventions: ``logits[b, t]`` is the distribution that scored ``token_ids[b, t]`` (the
shift by one is done already, as in a trainer's ``logits[:, :-1]`` against
``input_ids[:, 1:]``); ``mask[b, t]`` is true at the sequence's generated (output)
tokens, in order; ``lengths[b]`` instead says the first ``lengths[b]`` positions
are the output. From logits, logprobs, entropy and top-k come from
:func:`replay.trainer.capture.capture_logits` (one read of the logits, no fp32 copy).
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

from replay.trainer.capture import DEFAULT_K, CaptureSink, capture_logits
from replay.errors import BadInput

STORES = ("full", "delta", "hash")
FINGERPRINT_PREFIX = "fingerprint:"  # marks a device fingerprint stored where a sha256 would be
_FP_CHUNK = 1 << 24                  # words hashed per kernel launch (bounds temporary memory)
_MIX = 0x9E3779B97F4A7C15 - (1 << 64)  # 64-bit golden-ratio constant, as a signed int64


# --------------------------------------------------------------------------- masks


def _output_mask(token_ids: Any, mask: Any, lengths: Any) -> Any:
    import torch

    B, T = token_ids.shape
    if mask is not None:
        m = torch.as_tensor(mask, device=token_ids.device).bool()
        if m.shape != token_ids.shape:
            raise BadInput(f"mask has shape {list(m.shape)}, token_ids {list(token_ids.shape)}", field="mask")
        return m
    if lengths is None:
        raise BadInput("give mask [B, T] or lengths [B] to say which positions are output tokens",
                       field="mask")
    n = torch.as_tensor(lengths, device=token_ids.device).long()
    if n.shape != (B,) or bool((n < 0).any()) or bool((n > T).any()):
        raise BadInput(f"lengths must be {B} values in [0, {T}]", field="lengths")
    return torch.arange(T, device=token_ids.device)[None, :] < n[:, None]


def _per_sequence(values: Any, m: Any, name: str) -> list[float] | None:
    """One float per sequence from a [B] or [B, T] tensor/list (its first output position)."""
    import torch

    if values is None:
        return None
    v = torch.as_tensor(values).float().cpu() if not isinstance(values, torch.Tensor) else values.detach()
    if v.dim() == 1:
        if v.shape[0] != m.shape[0]:
            raise BadInput(f"{name} has {v.shape[0]} values for {m.shape[0]} sequences", field=name)
        return [float(x) for x in v.float().cpu()]
    if v.shape != m.shape:
        raise BadInput(f"{name} has shape {list(v.shape)}, expected [{m.shape[0]}] or {list(m.shape)}", field=name)
    first = torch.where(m.any(1), m.float().argmax(1), torch.zeros_like(m[:, 0], dtype=torch.long))
    return [float(x) for x in v.gather(1, first[:, None].to(v.device))[:, 0].float().cpu()]


# ---------------------------------------------------------------- trainer batches


def record_trainer_batch(rec: Any, *, step: int, request_ids: Sequence[str], token_ids: Any,
                         logits: Any = None, logprobs: Any = None, mask: Any = None, lengths: Any = None,
                         weight_version: Any = None, entropy: Any = None, advantages: Any = None,
                         temperature: float = 1.0, k: int = DEFAULT_K, sink: CaptureSink | None = None) -> None:
    """Record one trainer batch: a ``trainer`` row per sequence (logprobs, entropy,
    weight version, advantage) and, from logits, its top-k (``source="trainer"``).

    Give ``logits`` ``[B, T, V]`` (computed through :mod:`replay.trainer.capture`) or
    ``logprobs`` ``[B, T]`` (and optionally ``entropy`` ``[B, T]``). ``weight_version``:
    an int or one per sequence. With ``sink`` the host copies and recording happen on
    its background thread; without, CUDA tensors go to the recorder, which copies them
    asynchronously itself. Give ``mask`` / ``lengths`` / ``advantages`` as host tensors or
    lists: a device mask is copied to the host (one small synchronising copy).
    """
    import torch

    tok = torch.as_tensor(token_ids)
    if tok.dim() != 2:
        raise BadInput(f"token_ids must be [B, T], got shape {list(tok.shape)}", field="token_ids", step=step)
    B, T = tok.shape
    if len(request_ids) != B:
        raise BadInput(f"{len(request_ids)} request_ids for {B} sequences", field="request_ids", step=step)
    m = _output_mask(tok, mask, lengths).cpu()  # on the host: rows and lengths need no device sync
    adv = _per_sequence(advantages, m, "advantages")
    lens = [int(x) for x in m.sum(1)]
    scalar_version = weight_version if weight_version is None or isinstance(weight_version, int) else None
    rec.event("trainer_batch", step=step, weight_version=scalar_version, sequences=B, tokens=sum(lens),
              source="logits" if logits is not None else "logprobs")
    flat = m.reshape(-1)
    with torch.no_grad():
        if logits is not None:
            if logits.dim() != 3 or tuple(logits.shape[:2]) != (B, T):
                raise BadInput(f"logits must be [B, T, V] = [{B}, {T}, V], got {list(logits.shape)}",
                               field="logits", step=step)
            rows = flat.nonzero()[:, 0].to(logits.device, non_blocking=True)
            flat_tok = tok.reshape(-1).to(logits.device, non_blocking=True)
            if 2 * rows.numel() >= B * T and logits.is_contiguous():
                # dense batch: capture every row of the logits in place (no copy), keep the output rows
                cap = capture_logits(logits.reshape(B * T, -1), flat_tok.clamp(0, logits.shape[-1] - 1), k=k,
                                     temperature=temperature)[rows]
            else:
                sel = logits.reshape(B * T, -1).index_select(0, rows)
                cap = capture_logits(sel, flat_tok.index_select(0, rows), k=k, temperature=temperature)
        elif logprobs is not None:
            lp = torch.as_tensor(logprobs)
            if lp.shape != (B, T):
                raise BadInput(f"logprobs must be [B, T] = [{B}, {T}], got {list(lp.shape)}", field="logprobs",
                               step=step)
            sel_rows = flat.nonzero()[:, 0].to(lp.device, non_blocking=True)
            ent = None if entropy is None else torch.as_tensor(entropy).reshape(-1).index_select(0, sel_rows)
            cap = None
            lp_flat = lp.reshape(-1).index_select(0, sel_rows).float()
        else:
            raise BadInput("give logits or logprobs", field="logits", step=step)
    if cap is not None:
        if sink is not None:
            sink.submit(cap, step=step, request_ids=list(request_ids), lengths=lens,
                        weight_version=weight_version, advantages=adv)
            return
        lp_flat, ent = cap.logprobs, cap.entropy
    start = 0
    for b, (rid, n) in enumerate(zip(request_ids, lens)):
        end = start + n
        version = weight_version[b] if isinstance(weight_version, (list, tuple)) else weight_version
        rec.trainer(step=step, request_id=str(rid), weight_version=None if version is None else int(version),
                    logprobs=lp_flat[start:end], entropy=None if ent is None else ent[start:end].float(),
                    advantage=None if adv is None else adv[b])
        if cap is not None and k and n:
            rec.topk(step=step, request_id=str(rid), source="trainer", ids=cap.topk_ids[start:end],
                     logprobs=cap.topk_logprobs[start:end])
        start = end


# ------------------------------------------------------------------------ weights


def hash_state_dict_gpu(state_dict: Mapping[str, Any]) -> str:
    """A 32-hex-digit fingerprint of a state dict, computed where the tensors live.

    For each tensor (in name order) its bytes are read as 32-bit words ``w_i`` and two
    wrap-around int64 sums are taken on the device, ``Σ w_i`` and ``Σ w_i·(i·φ + 1)``
    (φ the 64-bit golden-ratio constant), so a changed or moved word changes the
    result; only these sums, names, dtypes and shapes go to the host, into blake2b.
    A fingerprint, not a cryptographic hash: it detects changed weights, it does not
    resist crafted collisions. The same tensors give the same fingerprint on any
    device. The sha256 of the bytes is computed on the host only when weights are
    stored (:func:`record_weights` with ``store="full"`` or ``"delta"``).
    """
    import torch

    h = hashlib.blake2b(digest_size=16)
    sums = []
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            raise BadInput(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor", field=name)
        t = t.detach().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        raw = t.reshape(-1).view(torch.uint8)
        pad = (-raw.numel()) % 4
        if pad:
            raw = torch.cat([raw, raw.new_zeros(pad)])
        words = raw.view(torch.int32)
        s1 = torch.zeros((), dtype=torch.int64, device=t.device)
        s2 = torch.zeros((), dtype=torch.int64, device=t.device)
        for lo in range(0, words.numel(), _FP_CHUNK):
            w = words[lo:lo + _FP_CHUNK].to(torch.int64) & 0xFFFFFFFF
            idx = torch.arange(lo, lo + w.numel(), dtype=torch.int64, device=t.device)
            s1 += w.sum()
            s2 += (w * (idx * _MIX + 1)).sum()
        sums.append(torch.stack([s1, s2]))
    if sums:
        for pair in torch.stack([s.cpu() for s in sums]).tolist():  # one transfer per tensor pair
            h.update(pair[0].to_bytes(8, "little", signed=True) + pair[1].to_bytes(8, "little", signed=True))
    return h.hexdigest()


def _state_dict(model: Any) -> Mapping[str, Any]:
    if hasattr(model, "state_dict"):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise BadInput(f"expected a torch module or a state dict, got {type(model).__name__}", field="model")


def record_weights(rec: Any, version: int, model: Any, *, step: int | None = None, store: str = "full",
                   path: str | None = None) -> str:
    """Record weight version ``version`` of ``model`` (a module or a state dict); returns its fingerprint.

    ``store``: ``"full"`` keeps the weights in the recording, ``"delta"`` as an XOR
    delta against the previous stored version, ``"hash"`` keeps only the device
    fingerprint (stored as ``"fingerprint:<hex>"`` in the sha256 column, with ``path``
    of an external checkpoint if given). A ``weights_fingerprint`` event carries the
    fingerprint in every case, so versions can be compared without their bytes.
    """
    if store not in STORES:
        raise BadInput(f"store must be one of {', '.join(STORES)}, not {store!r}", field="store", step=step)
    sd = _state_dict(model)
    fp = hash_state_dict_gpu(sd)
    rec.event("weights_fingerprint", step=step, weight_version=int(version), fingerprint=fp, store=store)
    if store == "hash":
        rec.weights(version=int(version), step=step, sha256=FINGERPRINT_PREFIX + fp, path=path)
    else:
        host = {k: v.detach().to("cpu") for k, v in sd.items()}
        rec.weights(version=int(version), step=step, state_dict=host, delta=store == "delta", path=path)
    return fp


# --------------------------------------------------------------------------- hook


class TrainerHook:
    """The trainer's recorder handle: batches go through a :class:`CaptureSink`
    (asynchronous host copies), weights through :func:`record_weights`, and the
    current weight version is remembered for batches that do not give one."""

    def __init__(self, rec: Any, *, k: int = DEFAULT_K, temperature: float = 1.0, slots: int = 3,
                 weight_version: int | None = None):
        self.rec = rec
        self.k = k                        # top-k width recorded per token
        self.temperature = temperature    # default sampling temperature of the run
        self.weight_version = weight_version  # version of the trainer's weights now
        self.sink = CaptureSink(rec, slots=slots)

    def record_batch(self, *, step: int, request_ids: Sequence[str], token_ids: Any, **kw: Any) -> None:
        kw.setdefault("weight_version", self.weight_version)
        kw.setdefault("temperature", self.temperature)
        kw.setdefault("k", self.k)
        record_trainer_batch(self.rec, step=step, request_ids=request_ids, token_ids=token_ids, sink=self.sink,
                             **kw)

    def record_weights(self, version: int, model: Any, *, step: int | None = None, store: str = "full",
                       path: str | None = None) -> str:
        self.sink.flush()
        fp = record_weights(self.rec, version, model, step=step, store=store, path=path)
        self.weight_version = int(version)
        return fp

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        self.sink.close()

    def __enter__(self) -> "TrainerHook":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
