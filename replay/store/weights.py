"""The weight store of a recording: content-addressed safetensors blobs, zstd, XOR deltas.

A weight version is serialised to safetensors bytes (a small writer below, numpy only,
byte-for-byte deterministic), addressed by the sha256 of those bytes and kept in
``<recording>/weights/blobs/`` as one of

* ``<sha>.zst``               zstd of the full safetensors bytes, or
* ``<sha>.xor-<basesha>.zst`` zstd of (bytes XOR the base version's bytes), used when
                              both have the same length (same names, shapes, dtypes):
                              consecutive RL versions differ little, so the XOR is
                              mostly zero bytes and compresses well.

Reading resolves the delta chain, verifies every sha256 on the way and returns a state
dict. torch is imported only when a torch tensor is written or ``framework="torch"``
is asked for. With ``framework="numpy"`` a BF16 tensor comes back as a ``uint16``
array holding the raw bfloat16 bits (numpy has no bfloat16).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import threading
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Mapping

import numpy as np
import zstandard

from replay.errors import BadInput, RecordingError

BLOBS_DIR = "weights/blobs"  # blob folder, relative to the recording directory
ZSTD_LEVEL = 3  # fast, and single-threaded so the same input gives the same blob
_MAX_ZSTD_RATIO = 40_000  # zstd cannot beat ~32768x (RLE blocks): a larger claim is corrupt
_MAX_CHAIN = 10_000  # longest delta chain followed before the store is called corrupt

# safetensors dtype tag -> numpy dtype of the stored bits (BF16 kept as raw uint16 bits)
_NP_OF_TAG: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_TAG_OF_NP = {v: k for k, v in _NP_OF_TAG.items() if k != "BF16"}
_TORCH_TAGS = {  # torch dtype name -> safetensors tag
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL",
}
_BLOB_NAME = re.compile(r"^([0-9a-f]{64})(?:\.xor-([0-9a-f]{64}))?\.zst$")


# --------------------------------------------------------------------------- codec

def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _to_numpy(name: str, value: Any) -> tuple[str, np.ndarray]:
    """(dtype tag, little-endian contiguous array of the stored bits) for one tensor."""
    if _is_torch(value):
        import torch

        t = value.detach().to("cpu").contiguous()
        tag = _TORCH_TAGS.get(str(t.dtype).removeprefix("torch."))
        if tag is None:
            raise BadInput(f"tensor {name!r} has dtype {t.dtype}, which the weight store "
                           f"does not support (use one of {sorted(_TORCH_TAGS)})", field=name)
        if tag == "BF16":
            return tag, t.view(torch.int16).numpy().view(np.uint16)
        return tag, t.numpy()
    if not isinstance(value, np.ndarray):
        raise BadInput(f"tensor {name!r} is a {type(value).__name__}; expected a numpy array "
                       "or a torch tensor", field=name)
    arr = value if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d shape
    if arr.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, if a caller uses it
        return "BF16", arr.view(np.uint16)
    tag = _TAG_OF_NP.get(arr.dtype.newbyteorder("<"))
    if tag is None:
        raise BadInput(f"array {name!r} has dtype {arr.dtype}, which the weight store does "
                       f"not support (use one of {sorted(_NP_OF_TAG)})", field=name)
    return tag, arr.astype(_NP_OF_TAG[tag], copy=False)


def serialize_state_dict(state_dict: Mapping[str, Any],
                         metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes of a state dict of numpy arrays and/or torch tensors.

    Deterministic: the JSON header has sorted keys and no spaces, and tensors are laid
    out by descending item size, then name (so every tensor is aligned, as the real
    safetensors writer does). ``metadata`` defaults to ``{"format": "pt"}``.
    """
    if not isinstance(state_dict, Mapping):
        raise BadInput(f"state_dict must be a mapping of name -> tensor, got "
                       f"{type(state_dict).__name__}")
    items = []
    for name, value in state_dict.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise BadInput(f"tensor name {name!r} is not allowed (names are str and not "
                           "'__metadata__')", field=str(name))
        tag, arr = _to_numpy(name, value)
        items.append((name, tag, arr))
    items.sort(key=lambda it: (-it[2].dtype.itemsize, it[0]))
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise BadInput("safetensors metadata must map str to str", field="metadata")
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, tag, arr in items:
        header[name] = {"dtype": tag, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    out = bytearray(8 + len(head) + offset)
    out[:8] = len(head).to_bytes(8, "little")
    out[8:8 + len(head)] = head
    pos = 8 + len(head)
    for _, _, arr in items:
        out[pos:pos + arr.nbytes] = arr.reshape(-1).view(np.uint8).data
        pos += arr.nbytes
    return bytes(out)


def sha256_of(state_dict: Mapping[str, Any]) -> str:
    """The content address ``WeightStore.put`` would give this state dict."""
    return hashlib.sha256(serialize_state_dict(state_dict)).hexdigest()


def deserialize_state_dict(data: bytes | bytearray, *, framework: str = "numpy",
                           source: str = "safetensors bytes") -> dict[str, Any]:
    """State dict from safetensors bytes; ``source`` names the data in error messages.

    ``framework="numpy"`` gives arrays (BF16 as raw ``uint16`` bits); ``"torch"``
    gives CPU tensors of the stored dtypes, bfloat16 included.
    """
    if framework not in ("numpy", "torch"):
        raise BadInput(f"framework must be 'numpy' or 'torch', got {framework!r}",
                       field="framework")
    buf = bytearray(data)  # one writable copy; every array below is a view of it
    if len(buf) < 8:
        raise RecordingError(f"{source}: {len(buf)} bytes is too short for safetensors")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise RecordingError(f"{source}: header length {n} exceeds the data ({len(buf)} B)")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordingError(f"{source}: the safetensors header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise RecordingError(f"{source}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    base, size = 8 + n, len(buf) - 8 - n
    out: dict[str, Any] = {}
    for name, info in header.items():
        try:
            tag, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
            dt = _NP_OF_TAG[tag]
            count = int(np.prod(shape, dtype=np.int64))
        except (KeyError, TypeError, ValueError) as e:
            raise RecordingError(f"{source}: bad header entry for tensor {name!r}: {info!r}",
                                 field=name) from e
        if not (0 <= start <= stop <= size) or stop - start != count * dt.itemsize:
            raise RecordingError(f"{source}: tensor {name!r} has data_offsets {[start, stop]} "
                                 f"that do not fit {tag}{shape} in {size} data bytes",
                                 field=name)
        arr = np.frombuffer(buf, dtype=dt, count=count, offset=base + start).reshape(shape)
        out[name] = arr if arr.flags.aligned else arr.copy()
    if framework == "numpy":
        return out
    import torch

    tensors = {}
    for name, arr in out.items():
        if header[name]["dtype"] == "BF16":
            tensors[name] = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            tensors[name] = torch.from_numpy(arr)
    return tensors


# --------------------------------------------------------------------------- store

def _xor(a: bytes, b: bytes) -> bytes:
    return np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)).tobytes()


class WeightStore:
    """Content-addressed weight blobs of one recording directory. Thread-safe."""

    def __init__(self, root: str | os.PathLike, *, max_chain: int = 32):
        self.root = Path(root)  # the recording directory
        self.blobs = self.root / BLOBS_DIR  # where the blobs live
        # longest delta chain put() builds: a delta whose base already sits this deep
        # is stored in full instead, so reading any version decompresses at most
        # max_chain + 1 blobs
        self.max_chain = max_chain
        self._lock = threading.Lock()
        # bytes of the last version put, the usual next base (one model copy in memory)
        self._last: tuple[str, bytes] | None = None
        self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True,
                                              write_content_size=True, threads=0)
        # verified bytes of versions read, newest last, within read_cache_bytes: reading
        # consecutive versions of a delta chain then decompresses one blob each
        self.read_cache_bytes = 256 << 20
        self._read: "collections.OrderedDict[str, bytes]" = collections.OrderedDict()
        self._read_lock = threading.Lock()   # its own: put() reads bases while holding _lock

    # ---- write
    def put(self, state_dict: Mapping[str, Any], *, base_sha256: str | None = None) -> dict:
        """Store one weight version, as an XOR delta against ``base_sha256`` if given.

        Returns ``{"sha256", "nbytes", "blob", "stored_bytes", "base_sha256",
        "fallback"}``: ``blob`` is relative to the recording directory; ``base_sha256``
        is the base actually used (None for a full blob) and ``fallback`` says why a
        requested delta was stored in full (None otherwise). A version already in the
        store is not written again.
        """
        data = serialize_state_dict(state_dict)
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            existing = self.find(sha)
            if existing is not None:
                self._last = (sha, data)
                return self._entry(sha, len(data), existing, None)
            fallback = None
            base_data = None
            if base_sha256 is not None:
                base_blob = self.find(base_sha256)
                if base_blob is None:
                    raise BadInput(f"base version {base_sha256} is not in the weight store "
                                   f"{self.blobs}; put it first", field="base_sha256")
                depth = self.chain_depth(base_blob)
                if depth >= self.max_chain:
                    fallback = (f"base {base_sha256[:12]} is already {depth} deltas deep "
                                f"(max_chain={self.max_chain}): stored in full")
                elif self._last is not None and self._last[0] == base_sha256:
                    base_data = self._last[1]
                else:
                    base_data = self.load_bytes(base_blob, base_sha256, remember=False)
                if base_data is not None and len(base_data) != len(data):
                    fallback = (f"base {base_sha256[:12]} has {len(base_data)} bytes, this "
                                f"version {len(data)}: stored in full")
                    base_data = None
            if base_data is None:
                name, payload = f"{sha}.zst", data
            else:
                name, payload = f"{sha}.xor-{base_sha256}.zst", _xor(data, base_data)
            self._write_atomic(self.blobs / name, self._cctx.compress(payload))
            self._last = (sha, data)
            return self._entry(sha, len(data), f"{BLOBS_DIR}/{name}", fallback)

    def _entry(self, sha: str, nbytes: int, blob: str, fallback: str | None) -> dict:
        m = _BLOB_NAME.match(PurePosixPath(blob).name)
        return {"sha256": sha, "nbytes": nbytes, "blob": blob,
                "stored_bytes": (self.root / blob).stat().st_size,
                "base_sha256": m.group(2) if m else None, "fallback": fallback}

    def _write_atomic(self, path: Path, payload: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    # ---- read
    def find(self, sha256: str) -> str | None:
        """Relative path of a blob holding version ``sha256`` (a full one first), or None."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            raise BadInput(f"{sha256!r} is not a sha256 hex digest", field="sha256")
        full = self.blobs / f"{sha256}.zst"
        if full.is_file():
            return f"{BLOBS_DIR}/{full.name}"
        deltas = sorted(self.blobs.glob(f"{sha256}.xor-*.zst")) if self.blobs.is_dir() else []
        return f"{BLOBS_DIR}/{deltas[0].name}" if deltas else None

    def _resolve(self, blob: str) -> Path:
        """Absolute path of ``blob``, refusing anything outside the recording directory."""
        if not isinstance(blob, str) or not blob:
            raise RecordingError(f"weight blob path {blob!r} is empty or not a string",
                                 field="blob")
        if (PurePosixPath(blob).is_absolute() or PureWindowsPath(blob).is_absolute()
                or ".." in PurePosixPath(blob.replace("\\", "/")).parts):
            raise RecordingError(f"weight blob {blob!r} points outside the recording "
                                 f"{self.root} (absolute path or '..')", field="blob")
        path = (self.root / blob).resolve()
        root = self.root.resolve()
        if not path.is_relative_to(root):
            raise RecordingError(f"weight blob {blob!r} resolves to {path}, outside the "
                                 f"recording {root} (a symlink escapes it)", field="blob")
        if not path.is_file():
            raise RecordingError(f"weight blob {blob!r} is missing from {root}", field="blob")
        return path

    def _decompress(self, blob: str, path: Path) -> bytes:
        raw = path.read_bytes()
        try:
            size = zstandard.frame_content_size(raw)
            if size < 0 or size > _MAX_ZSTD_RATIO * len(raw) + (1 << 20):
                raise zstandard.ZstdError(f"implausible content size {size}")
            return zstandard.ZstdDecompressor().decompress(raw, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise RecordingError(f"weight blob {blob!r} is corrupt or truncated: cannot "
                                 f"decompress it ({e})", field="blob") from e

    def load_bytes(self, blob: str, sha256: str, *, remember: bool = True) -> bytes:
        """The verified safetensors bytes of version ``sha256`` stored in ``blob`` (kept in the read
        cache with ``remember``, so the next version of a delta chain decompresses one blob)."""
        self._resolve(blob)  # refuse paths outside the recording before anything else
        chain: list[tuple[str, str]] = []  # (blob, sha) from the asked version to a full one
        seen: set[str] = set()
        cur_blob, cur_sha = blob, sha256
        data = b""
        while True:
            with self._read_lock:
                hit = self._read.get(cur_sha)
            if hit is not None:   # a version already read and verified: the chain starts from it
                data = hit
                break
            chain.append((cur_blob, cur_sha))
            seen.add(cur_sha)
            m = _BLOB_NAME.match(PurePosixPath(cur_blob.replace("\\", "/")).name)
            if m is None:
                raise RecordingError(f"weight blob {cur_blob!r} has an unknown name (expected "
                                     "<sha256>.zst or <sha256>.xor-<sha256>.zst)", field="blob")
            base_sha = m.group(2)
            if base_sha is None:
                break
            if base_sha in seen or len(chain) > _MAX_CHAIN:
                raise RecordingError(f"weight blob {cur_blob!r} has a cyclic or endless "
                                     "delta chain", field="blob")
            base_blob = self._find_base(base_sha, seen)
            if base_blob is None:
                raise RecordingError(f"weight blob {cur_blob!r} is a delta against "
                                     f"{base_sha}, which is missing from {self.blobs}",
                                     field="blob")
            cur_blob, cur_sha = base_blob, base_sha
        for i, (b, sha) in enumerate(reversed(chain)):
            payload = self._decompress(b, self._resolve(b))
            if i > 0 or data:
                if len(payload) != len(data):
                    raise RecordingError(f"weight blob {b!r} is a delta of {len(payload)} "
                                         f"bytes against a base of {len(data)}", field="blob")
                payload = _xor(payload, data)
            got = hashlib.sha256(payload).hexdigest()
            if got != sha:
                raise RecordingError(f"weight blob {b!r} should hold version {sha} but its "
                                     f"content hashes to {got}", field="blob")
            data = payload
            if remember:
                self._remember(sha, data)
        return data

    def _remember(self, sha: str, data: bytes) -> None:
        with self._read_lock:
            self._read[sha] = data
            self._read.move_to_end(sha)
            while self._read and sum(map(len, self._read.values())) > self.read_cache_bytes:
                self._read.popitem(last=False)

    def chain_depth(self, blob: str) -> int:
        """How many deltas lie between ``blob`` and its full base (0 for a full blob)."""
        depth, seen, name = 0, set(), PurePosixPath(blob).name
        while (m := _BLOB_NAME.match(name)) and m.group(2) is not None:
            seen.add(m.group(1))
            base = self._find_base(m.group(2), seen)
            if base is None or depth > _MAX_CHAIN:
                break
            depth, name = depth + 1, PurePosixPath(base).name
        return depth

    def _find_base(self, sha: str, seen: set[str]) -> str | None:
        full = self.blobs / f"{sha}.zst"
        if full.is_file():
            return f"{BLOBS_DIR}/{full.name}"
        for p in sorted(self.blobs.glob(f"{sha}.xor-*.zst")):
            m = _BLOB_NAME.match(p.name)
            if m and m.group(2) not in seen:
                return f"{BLOBS_DIR}/{p.name}"
        return None

    def load(self, blob: str, sha256: str, *, framework: str = "torch") -> dict[str, Any]:
        """State dict of version ``sha256``: torch tensors, or numpy arrays (BF16 as uint16)."""
        if framework not in ("numpy", "torch"):
            raise BadInput(f"framework must be 'numpy' or 'torch', got {framework!r}",
                           field="framework")
        return deserialize_state_dict(self.load_bytes(blob, sha256), framework=framework,
                                      source=f"weight blob {blob!r}")


# ---------------------------------------------------------------- weights recorded by hash

def checkpoint_candidates(folder: Path, version: int, recorded_path: str | None) -> list[Path]:
    """Where, inside ``folder``, the checkpoint of a version recorded by hash may be: the last
    part of its recorded path (``s3://ckpt/step-3`` → ``folder/step-3``), then the version
    number (``folder/3``), each a folder of ``*.safetensors`` or one ``.safetensors`` file; then
    ``folder`` itself when it is a single checkpoint. Nothing outside ``folder`` is read."""
    names: list[str] = []
    if recorded_path:
        last = str(recorded_path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        if last not in ("", ".", ".."):
            names.append(last)
    names.append(str(int(version)))
    out: list[Path] = []
    for name in dict.fromkeys(names):
        for p in (folder / name, folder / f"{name}.safetensors"):
            if p not in out:
                out.append(p)
    return out + [folder]


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    from safetensors.torch import load_file  # torch: bfloat16 tensors have no numpy dtype

    files = [path] if path.is_file() and path.suffix == ".safetensors" else \
        sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    sd: dict[str, Any] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def load_by_hash(folder: str | os.PathLike, version: int, sha256: str, recorded_path: str | None = None, *,
                 framework: str = "torch") -> dict[str, Any]:
    """The state dict of weight ``version``, recorded by its hash only, from its checkpoint in
    ``folder`` (:func:`checkpoint_candidates`), refused unless it has the recorded ``sha256``
    (the content address :func:`sha256_of` gives)."""
    base = Path(folder)
    if not base.is_dir():
        raise BadInput(f"--weights-from {base}: not a folder", field="weights_from")
    tried: list[str] = []
    for cand in checkpoint_candidates(base, version, recorded_path):
        sd = _read_checkpoint(cand)
        if sd is None:
            continue
        data = serialize_state_dict(sd)
        got = hashlib.sha256(data).hexdigest()
        if got == sha256:
            return deserialize_state_dict(data, framework=framework, source=str(cand))
        tried.append(f"{cand} hashes to {got[:12]}")
    where = "; ".join(tried) if tried else (
        "no checkpoint found at " + ", ".join(str(c) for c in checkpoint_candidates(base, version, recorded_path)))
    raise RecordingError(f"weight version {version} was recorded by hash only (sha256 {sha256[:12]}, path "
                         f"{recorded_path or 'not recorded'}) and no checkpoint in {base} has that hash: {where}",
                         "weights not found")
