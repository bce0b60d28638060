"""Tiny Qwen2 and Llama checkpoints built locally, and loaders for any HF-format checkpoint.

Nothing is downloaded: :func:`build_model` writes a complete HF-format folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``generation_config.json``) that transformers, vLLM
(CPU and GPU builds) and the reference engine all load. A user's own local
checkpoint folder works wherever a built one does.

Two architectures (``arch``): ``qwen2`` (the default; biases on q, k and v) and ``llama``
(no biases), same sizes, same vocabulary. Sizes (head_dim is 64 for both: vLLM's CPU
attention rejects smaller heads):

======= ====== ====== ===== ======== ============ ============
size    hidden layers heads KV heads intermediate parameters
======= ====== ====== ===== ======== ============ ============
tiny    128    2      2     1        256          ~0.3 M
small   384    6      6     2        1024         ~9.5 M
======= ====== ====== ===== ======== ============ ============

Vocabulary (:data:`DEFAULT_VOCAB`, 64 tokens, ids in this order)::

    0-3    <pad> <bos> <eos> <unk>
    4-13   0 1 2 3 4 5 6 7 8 9
    14-25  : , = + - * > < ( ) ? .
    26-45  sort copy rev add sub mul max min sum count len and or not yes no
           answer input output to
    46-63  a b c d e f g h i j k l m n o p q r

Text is split on whitespace and punctuation, and numbers into single digits, so
``"sort: 31, 4"`` encodes as ``sort : 3 1 , 4``; spaces are not tokens. Unknown
words become ``<unk>``. Special tokens: ``<pad>`` (padding), ``<bos>`` (prepended
by nothing automatically; prompts add it when they want it), ``<eos>`` (stop); typed
in text they encode as one token each. Load the tokenizer with :func:`load_tokenizer`:
transformers 5's ``AutoTokenizer`` swaps in Qwen2's byte-level BPE for any qwen2
folder, which keeps ids and decoding but splits words into letters when encoding.

Weights are drawn from a seeded ``torch.Generator`` and stored in bfloat16, so a
(size, seed, vocab) triple always gives the same bytes. The lm_head is a separate
matrix (``tie_word_embeddings=False``), scaled so the next-token distribution of
the random model is peaked enough (entropy of a few nats at most) to make
sampling settings matter.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, cast

from replay.errors import BadInput

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

DEFAULT_VOCAB: tuple[str, ...] = (
    *"0123456789",
    ":", ",", "=", "+", "-", "*", ">", "<", "(", ")", "?", ".",
    "sort", "copy", "rev", "add", "sub", "mul", "max", "min", "sum", "count", "len",
    "and", "or", "not", "yes", "no", "answer", "input", "output", "to",
    *"abcdefghijklmnopqr",
)

# Bumped whenever the bytes a (size, seed, vocab) triple produces change.
FORMAT_VERSION = 2
MARKER = ".replay-model.json"
ARCHS = ("qwen2", "llama")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "generation_config.json")


@dataclass(frozen=True)
class ModelShape:
    """Architecture numbers of one built size."""

    hidden_size: int          # width of the residual stream
    num_hidden_layers: int    # transformer blocks
    num_attention_heads: int  # query heads (head_dim = hidden_size / heads = 64)
    num_key_value_heads: int  # KV heads (grouped-query attention)
    intermediate_size: int    # SwiGLU MLP width
    max_position_embeddings: int = 2048  # longest sequence the rotary table is meant for


SIZES: dict[str, ModelShape] = {
    "tiny": ModelShape(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=256),
    "small": ModelShape(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                        num_key_value_heads=2, intermediate_size=1024),
}

# ---------------------------------------------------------------------------- build


def recorded_model(recording: str | Path, run_config: dict | None) -> tuple[str | None, Path | None]:
    """The model folder of a recording and where its config and tokenizer are now.

    A model the recording carries (``Recorder.model``: ``<recording>/model``, every file
    checked against its sha256) comes first: it is the one the run used, whatever has
    happened to the checkpoint since. Else the folder the run config names
    (``run_config["model"]``, a path or ``{"path": ...}``): as written (absolute, or
    relative to the working directory), else relative to the recording folder or one of
    its parents (a relative path recorded from a project root still resolves from another
    working directory). ``(named, None)`` when no folder with a ``config.json`` is found.
    The carried folder has no weight files: :func:`recording_model` gives a loadable one."""
    from replay.store.model import MODEL_DIR, stored_model

    model = (run_config or {}).get("model")
    named = model.get("path") if isinstance(model, dict) else model
    named = named if isinstance(named, str) and named else None
    meta = stored_model(recording)
    if meta is not None:
        return named or meta.get("source"), Path(recording) / MODEL_DIR
    if named is None:
        return None, None
    candidates = [Path(named)]
    if not Path(named).is_absolute():
        root = Path(recording).resolve()
        candidates += [base / named for base in (root, *root.parents)]
    found = next((c for c in candidates if (c / "config.json").is_file()), None)
    return named, found


def recording_model(recording: str | Path, run_config: dict | None) -> Path:
    """A loadable checkpoint folder for a recording (see :func:`recorded_model`; a carried
    model is materialized by :func:`replay.store.model.materialize`), or a RecordingError
    that says how to supply one."""
    from replay.errors import RecordingError
    from replay.store.model import MODEL_DIR, materialize

    named, found = recorded_model(recording, run_config)
    if found is not None and found == Path(recording) / MODEL_DIR:
        from replay.read.recording import open_recording

        with open_recording(recording) as rec:
            return materialize(recording, rec.load_weights)
    if named is None:
        raise RecordingError(f"{recording}: the recording carries no model (Recorder.model) and the run "
                             "config names none (run_config['model']); pass model_path= (--model PATH)", "no model")
    if found is None:
        raise RecordingError(f"{recording}: the model folder {named} recorded in the run config is not "
                             "there (looked from the working directory and from the recording's folders); "
                             "pass model_path= (--model PATH)", "no model")
    return found


def build_model(out_dir: str | Path, size: str = "tiny", seed: int = 0,
                vocab: Sequence[str] | None = None, arch: str = "qwen2") -> Path:
    """Write a random-weight checkpoint of ``arch`` (:data:`ARCHS`) in HF format to
    ``out_dir`` and return its path.

    ``vocab`` lists the ordinary tokens (the four special tokens come first and are
    added for you); it defaults to :data:`DEFAULT_VOCAB`. Deterministic: the same
    (arch, size, seed, vocab) writes the same bytes. Idempotent: if ``out_dir`` already
    holds that model (marker file plus every checkpoint file), it returns at once.
    """
    if size not in SIZES:
        raise BadInput(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}", field="size")
    if arch not in ARCHS:
        raise BadInput(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}", field="arch")
    tokens = _full_vocab(vocab)
    out = Path(out_dir)
    marker = {"format_version": FORMAT_VERSION, "size": size, "seed": int(seed),
              "vocab_sha256": hashlib.sha256("\n".join(tokens).encode()).hexdigest()}
    if arch != "qwen2":   # Qwen2 folders built before there was a choice keep their marker
        marker["arch"] = arch
    if _marker_matches(out, marker):
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then move file by file (marker last): a reader, or a second
    # builder of the same model, never sees a half-written file.
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        shape = SIZES[size]
        _write_json(tmp / "config.json", _config_dict(shape, len(tokens), arch))
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": True,
        })
        _write_weights(tmp / "model.safetensors", shape, len(tokens), seed, arch)
        _write_tokenizer(tmp, tokens)
        _write_json(tmp / MARKER, marker)
        (out / MARKER).unlink(missing_ok=True)  # a half-replaced folder must not look complete
        for f in CHECKPOINT_FILES + (MARKER,):
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _full_vocab(vocab: Sequence[str] | None) -> list[str]:
    words = list(DEFAULT_VOCAB if vocab is None else vocab)
    tokens = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
    if len(set(tokens)) != len(tokens):
        raise BadInput("vocab has duplicate tokens", field="vocab")
    if any((not isinstance(t, str)) or (not t) or any(c.isspace() for c in t) for t in tokens):
        raise BadInput("vocab tokens must be non-empty strings without whitespace", field="vocab")
    return tokens


def _marker_matches(out: Path, marker: dict) -> bool:
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return found == marker and all((out / f).is_file() for f in CHECKPOINT_FILES)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _config_dict(shape: ModelShape, vocab_size: int, arch: str = "qwen2") -> dict:
    head_dim = shape.hidden_size // shape.num_attention_heads
    rope_theta = 10000.0
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        # Both spellings: older readers want rope_theta, transformers 5 rope_parameters.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": shape.num_hidden_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        # Both spellings: transformers 5 reads dtype, older readers torch_dtype.
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    if arch == "llama":
        for key in ("use_sliding_window", "sliding_window", "max_window_layers"):
            del config[key]
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return config


def random_state_dict(shape: ModelShape, vocab_size: int, seed: int, arch: str = "qwen2") -> dict:
    """HF-named float32 tensors of a random ``arch`` model with ``shape``, drawn from one
    seeded generator (a Llama draws the same tensors but the q/k/v biases)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    h, inter = shape.hidden_size, shape.intermediate_size
    hd = h // shape.num_attention_heads
    kv = shape.num_key_value_heads * hd

    def normal(*dims: int, std: float) -> "torch.Tensor":
        return torch.randn(*dims, generator=gen, dtype=torch.float32) * std

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab_size, h, std=1.0)}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1.0 + normal(h, std=0.05)
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            sd[p + f"self_attn.{name}.weight"] = normal(rows, h, std=h ** -0.5)
            bias = normal(rows, std=0.02)   # drawn for both, so both draw the same other tensors
            if arch == "qwen2":
                sd[p + f"self_attn.{name}.bias"] = bias
        sd[p + "self_attn.o_proj.weight"] = normal(h, h, std=0.5 * h ** -0.5)
        sd[p + "post_attention_layernorm.weight"] = 1.0 + normal(h, std=0.05)
        sd[p + "mlp.gate_proj.weight"] = normal(inter, h, std=h ** -0.5)
        sd[p + "mlp.up_proj.weight"] = normal(inter, h, std=h ** -0.5)
        sd[p + "mlp.down_proj.weight"] = normal(h, inter, std=0.5 * inter ** -0.5)
    sd["model.norm.weight"] = 1.0 + normal(h, std=0.05)
    # Logit std about 2.5 at a unit-RMS final hidden state: peaked, not one-hot.
    sd["lm_head.weight"] = normal(vocab_size, h, std=2.5 * h ** -0.5)
    return sd


def _write_weights(path: Path, shape: ModelShape, vocab_size: int, seed: int, arch: str) -> None:
    import torch
    from safetensors.torch import save_file

    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in random_state_dict(shape, vocab_size, seed, arch).items()}
    save_file(dict(sorted(sd.items())), str(path), metadata={"format": "pt"})


def _write_tokenizer(out: Path, tokens: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Punctuation(),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", model_max_length=2048,
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))
    # transformers 5 names its class TokenizersBackend, which transformers 4 (a V0 engine's
    # environment) cannot resolve; PreTrainedTokenizerFast resolves in both.
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(out / "tokenizer_config.json", tok_cfg)
    special = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
    if not (out / "special_tokens_map.json").is_file():
        _write_json(out / "special_tokens_map.json", special)


# ----------------------------------------------------------------------------- load

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def dtype_name(dtype: Any) -> str:
    """The canonical name ("float32", "bfloat16", "float16") of a dtype name, alias or ``torch.dtype``
    (no torch import)."""
    key = str(dtype).replace("torch.", "")
    if key not in _DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16", field="dtype")
    return _DTYPES[key]


def torch_dtype(dtype: Any) -> Any:
    """A ``torch.dtype`` from a name ("float32", "bf16", ...) or a dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return getattr(torch, _DTYPES[dtype])
    raise BadInput(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16", field="dtype")


def _checkpoint_dir(path: str | Path) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise BadInput(f"{p} is not a HF-format checkpoint folder (no config.json); "
                       "build one with replay.models.build_model(out_dir)", field="model_path")
    return p


def load_model(path: str | Path, dtype: Any = "float32", device: str = "cpu",
               attn_implementation: str = "eager") -> Any:
    """The checkpoint at ``path`` as a transformers causal LM (``Qwen2ForCausalLM`` for
    built models) in ``dtype`` on ``device``, in eval mode.

    Attention defaults to transformers' "eager" implementation: with it a right-padded
    batch gives each sequence the numbers it gets alone (CPU "sdpa" in bfloat16 takes
    another kernel when a padding mask is present and moves logprobs by ~0.02).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    p = _checkpoint_dir(path)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # a bar per load would flood stderr in loops of loads
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype(dtype),
                                                     attn_implementation=attn_implementation)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    # (transformers wraps PreTrainedModel.to with functools.wraps, which mypy reads as an unbound function)
    return cast(Any, model).to(device).eval()


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer: ``PreTrainedTokenizerFast`` over ``tokenizer.json`` for a
    word-level tokenizer (built models), ``AutoTokenizer`` for any other checkpoint.

    Why not always ``AutoTokenizer``: transformers 5 forces its Qwen2 byte-level BPE class
    on every ``model_type="qwen2"`` folder, which rebuilds a BPE from our word list and
    splits multi-letter words into letters. Token ids and decoding agree either way, so
    engines fed token ids (vLLM included) are unaffected; text → ids must use this loader.
    """
    p = _checkpoint_dir(path)
    tok_file = p / "tokenizer.json"
    if tok_file.is_file():
        try:
            kind = json.loads(tok_file.read_text()).get("model", {}).get("type")
        except ValueError:
            kind = None
        if kind == "WordLevel":
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(p))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p))


def load_config(path: str | Path) -> dict:
    """The checkpoint's ``config.json`` as a dict."""
    return json.loads((_checkpoint_dir(path) / "config.json").read_text())


def load_state_dict(path: str | Path, dtype: Any = None) -> dict:
    """HF-named tensors of the checkpoint's ``*.safetensors`` files (cast to ``dtype`` if given)."""
    from replay.store.model import checkpoint_state_dict

    sd = checkpoint_state_dict(_checkpoint_dir(path))
    if dtype is not None:
        dt = torch_dtype(dtype)
        sd = {k: v.to(dt) for k, v in sd.items()}
    return sd


def check_device(device: str) -> None:
    """A one-line :class:`BadInput` (field ``device``) unless ``device`` names a torch device
    this machine has: ``cpu``, or ``cuda`` / ``cuda:N`` with a visible CUDA device N."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BadInput(f"unknown device {device!r}; use cpu, cuda or cuda:N", field="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"device {device!r} asked for, but this machine has no CUDA device; use "
                           "--device cpu", field="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInput(f"device {device!r} asked for, but this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s)", field="device")
    elif dev.type not in ("cpu", "cuda"):
        raise BadInput(f"device {device!r} is not supported here; use cpu, cuda or cuda:N", field="device")
