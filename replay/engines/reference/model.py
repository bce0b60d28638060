"""The Qwen2 / Llama forward of the reference engine, in plain PyTorch.

RMSNorm, rotary embeddings, grouped-query attention with an explicit KV buffer,
SwiGLU MLP and a separate lm_head, computed the way transformers computes them
(norms and rotary tables in float32, the rest in the model dtype), so a float32
run matches transformers' logits to ~1e-5.

Weights are kept per *unit* (embeddings, each transformer layer, final norm +
lm_head) and per version, and a :class:`ServingView` says which version each unit
serves now. A weight update moves every unit at once, between two decode steps, as
vLLM loads weights between engine steps.

Exactness by construction (the replayer relies on it):

* every linear op pads its rows to a multiple of :data:`ROW_BLOCK`: on CPU a GEMM
  row then gets the same bits whatever the other rows are, so results do not depend
  on batch composition and a prefill computes the same K/V a decode would;
* attention runs each query row over a view of its request's KV buffer (rows that
  attend over the same number of keys go through one batched matmul, whose entries
  are computed one (row, head) at a time), so a prefill, a decode step and a
  prefix-cache hit give bit-identical outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from replay.errors import BadInput, EngineError

ROW_BLOCK = 16  # rows of every GEMM are padded to a multiple of this


@dataclass(frozen=True)
class ArchConfig:
    """The architecture numbers the forward needs, read from a HF ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict) -> "ArchConfig":
        arch = (cfg.get("architectures") or ["?"])[0]
        if cfg.get("model_type") not in ("qwen2", "llama"):
            raise EngineError(f"the reference engine runs Qwen2 and Llama checkpoints, not "
                              f"model_type={cfg.get('model_type')!r} ({arch})", field="model_type")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise EngineError(f"rope_type {rope_type!r} is not supported by the reference engine",
                              field="rope_parameters")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   num_layers=cfg["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), eos_token_ids=eos_ids)


# ------------------------------------------------------------------ weights by unit

LAYER_KEYS = ("input_layernorm.weight", "post_attention_layernorm.weight",
              "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
              "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
              "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
              "mlp.down_proj.weight")


@dataclass
class VersionWeights:
    """One weight version, grouped by unit (embeddings, each layer, final norm + lm_head)."""

    embed: torch.Tensor                      # [vocab, hidden], model dtype
    layers: list[dict[str, torch.Tensor]]    # per layer, LAYER_KEYS without the prefix
    norm: torch.Tensor                       # final RMSNorm weight, model dtype
    lm_head: torch.Tensor                    # [vocab, hidden], lm_head dtype


def split_state_dict(sd: dict, arch: ArchConfig, dtype: torch.dtype, head_dtype: torch.dtype,
                     device: str, base: VersionWeights | None = None) -> VersionWeights:
    """HF-named tensors → :class:`VersionWeights`; names missing from ``sd`` come from ``base``."""
    known = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    known |= {f"model.layers.{i}.{k}" for i in range(arch.num_layers) for k in LAYER_KEYS}
    unknown = sorted(k for k in sd if k not in known and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise BadInput(f"unknown weight name(s) for this {arch.num_layers}-layer model: "
                       f"{', '.join(unknown[:5])}", field="state_dict")

    def get(name: str, old: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor | None:
        if name in sd:
            t = torch.as_tensor(sd[name])
            if old is not None and tuple(t.shape) != tuple(old.shape):
                raise BadInput(f"{name} has shape {tuple(t.shape)}, expected {tuple(old.shape)}",
                               field="state_dict")
            # A private copy: the caller (a trainer) may update its tensors in place later.
            return t.detach().to(device=device, dtype=dt).clone(memory_format=torch.contiguous_format)
        return old

    embed = get("model.embed_tokens.weight", base.embed if base else None, dtype)
    layers = []
    for i in range(arch.num_layers):
        old = base.layers[i] if base else {}
        layer = {}
        for k in LAYER_KEYS:
            t = get(f"model.layers.{i}.{k}", old.get(k), dtype)
            if t is not None:
                layer[k] = t
        layers.append(layer)
    norm = get("model.norm.weight", base.norm if base else None, dtype)
    head = get("lm_head.weight", base.lm_head if base else None, head_dtype)
    if head is None and arch.tie_word_embeddings and "model.embed_tokens.weight" in sd:
        head = get("model.embed_tokens.weight", None, head_dtype)
    missing = [n for n, t in (("model.embed_tokens.weight", embed), ("model.norm.weight", norm),
                              ("lm_head.weight", head)) if t is None]
    missing += [f"model.layers.{i}.{k}" for i, layer in enumerate(layers) for k in LAYER_KEYS
                if k not in layer and not k.endswith("bias")]
    if missing:
        raise BadInput(f"state dict lacks {len(missing)} weight(s), e.g. {missing[0]}", field="state_dict")
    assert embed is not None and norm is not None and head is not None  # else listed in missing
    return VersionWeights(embed, layers, norm, head)


@dataclass
class ServingView:
    """Which version serves each unit now (every unit the same version: updates move them together)."""

    embed: int
    layers: list[int]
    head: int                                # final norm + lm_head

    @classmethod
    def uniform(cls, version: int, num_layers: int) -> "ServingView":
        return cls(version, [version] * num_layers, version)

    def versions(self) -> set[int]:
        return {self.embed, self.head, *self.layers}

    def copy(self) -> "ServingView":
        return ServingView(self.embed, list(self.layers), self.head)

    def key(self) -> tuple:
        """Hashable: rows under equal keys run the same weights."""
        return (self.embed, tuple(self.layers), self.head)


# --------------------------------------------------------------------- KV buffers

@dataclass
class RequestKV:
    """Per-request KV buffer: keys and values of every computed position, per layer."""

    k: list[torch.Tensor]                    # per layer [kv_heads, capacity, head_dim]
    v: list[torch.Tensor]
    length: int = 0                          # positions computed so far

    @classmethod
    def empty(cls, arch: ArchConfig, capacity: int, dtype: torch.dtype, device: str) -> "RequestKV":
        shape = (arch.num_kv_heads, capacity, arch.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_layers)])


# ------------------------------------------------------------------------ forward

def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with rows padded to a multiple of ROW_BLOCK (row results independent of the batch)."""
    n = x.shape[0]
    pad = (-n) % ROW_BLOCK
    if n == 0:
        return x.new_zeros((0, w.shape[0]))
    if pad or n < ROW_BLOCK:
        x = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))], 0)
    return F.linear(x, w, b)[:n]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotary(positions: torch.Tensor, arch: ArchConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device)
                                          .float() / d))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def attend_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int) -> torch.Tensor:
    """One query row ``q`` [heads, d] over keys/values [kv_heads, T, d].

    The op order of transformers' eager attention: scores and the weighted sum in the
    model dtype, softmax in float32 (so a bf16 run rounds where the trainer's does).
    """
    kvh, _, d = k.shape
    qg = q.view(kvh, group, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (d ** -0.5)
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).reshape(-1)


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int) -> torch.Tensor:
    """:func:`attend_row` for ``B`` rows at once over equally long keys: q [B, heads, d],
    k / v [B, kv_heads, T, d]. The same batched matmuls per (row, kv head), so each row
    gets the bits it gets alone (a test holds the engine to it)."""
    b, kvh, _, d = k.shape
    qg = q.view(b, kvh, group, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * (d ** -0.5)
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).reshape(b, -1)


@dataclass
class Chunk:
    """Consecutive positions of one request to run through the model."""

    tokens: list[int]
    start: int                               # position of tokens[0]
    kv: RequestKV
    out_rows: list[int] = field(default_factory=list)  # indices into tokens whose final hidden state is wanted


def forward(chunks: list[Chunk], weights: dict[int, VersionWeights], view: ServingView,
            arch: ArchConfig, dtype: torch.dtype, device: str,
            capture: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``chunks`` (one per request) through the model as ``view`` serves it.

    Writes K/V of every position into its request's buffer and returns the final
    (normed) hidden states of the rows named in each chunk's ``out_rows``, in order.
    ``capture``, if given, receives the residual stream of every row after the
    embeddings and after each layer (the points a layer bisection compares).
    """
    ids = torch.tensor([t for c in chunks for t in c.tokens], dtype=torch.long, device=device)
    pos = torch.tensor([c.start + i for c in chunks for i in range(len(c.tokens))], device=device)
    h = weights[view.embed].embed[ids]
    if capture is not None:
        capture.append(h)
    cos, sin = rotary(pos, arch, dtype)
    nh, nkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    group = nh // nkv
    for li in range(arch.num_layers):
        w = weights[view.layers[li]].layers[li]
        x = rms_norm(h, w["input_layernorm.weight"], arch.rms_norm_eps)
        q = linear(x, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias")).view(-1, nh, d)
        k = linear(x, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias")).view(-1, nkv, d)
        vv = linear(x, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias")).view(-1, nkv, d)
        q = _rotate(q, cos[:, None, :], sin[:, None, :])
        k = _rotate(k, cos[:, None, :], sin[:, None, :])
        attn = torch.empty((ids.shape[0], nh * d), dtype=dtype, device=device)
        row = 0
        by_len: dict[int, list[tuple[int, Chunk]]] = {}   # rows that attend over the same number of keys
        for c in chunks:
            n = len(c.tokens)
            if c.start + n > c.kv.k[li].shape[1]:
                raise EngineError(f"KV buffer of {c.kv.k[li].shape[1]} positions overflows at {c.start + n}")
            c.kv.k[li][:, c.start:c.start + n] = k[row:row + n].transpose(0, 1)
            c.kv.v[li][:, c.start:c.start + n] = vv[row:row + n].transpose(0, 1)
            for i in range(n):
                by_len.setdefault(c.start + i + 1, []).append((row + i, c))
            row += n
        for end, rows in by_len.items():
            if len(rows) == 1:
                r, c = rows[0]
                attn[r] = attend_row(q[r], c.kv.k[li][:, :end], c.kv.v[li][:, :end], group)
            else:
                idx = torch.tensor([r for r, _ in rows], dtype=torch.long, device=device)
                attn[idx] = attend_rows(q[idx], torch.stack([c.kv.k[li][:, :end] for _, c in rows]),
                                        torch.stack([c.kv.v[li][:, :end] for _, c in rows]), group)
        h = h + linear(attn, w["self_attn.o_proj.weight"])
        x = rms_norm(h, w["post_attention_layernorm.weight"], arch.rms_norm_eps)
        x = F.silu(linear(x, w["mlp.gate_proj.weight"])) * linear(x, w["mlp.up_proj.weight"])
        h = h + linear(x, w["mlp.down_proj.weight"])
        if capture is not None:
            capture.append(h)
    for c in chunks:
        c.kv.length = max(c.kv.length, c.start + len(c.tokens))
    offsets, row = [], 0
    for c in chunks:
        offsets += [row + r for r in c.out_rows]
        row += len(c.tokens)
    picked = h[torch.tensor(offsets, dtype=torch.long, device=device)]
    return rms_norm(picked, weights[view.head].norm, arch.rms_norm_eps)


def project(hidden: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """Logits of final hidden states in the lm_head's dtype, returned as float32 (as vLLM's sampler takes them)."""
    return linear(hidden.to(lm_head.dtype), lm_head).float()
