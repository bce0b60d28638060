"""The model a recording carries, so that a copied recording replays anywhere.

``Recorder.model(path)`` copies the checkpoint's small files (``config.json``,
``generation_config.json``, the tokenizer's files) into ``<recording>/model/`` and stores
the checkpoint's weights as weight version 0 in the recording's weight store (or, with
``store_weights=False``, names the checkpoint's weight files, by size, where they are).
``model/model.json`` lists every copied file with its size and sha256::

    {"format_version": 1, "source": "/abs/path", "weights_version": 0, "weights_sha256": "...",
     "files": {"config.json": {"size": 712, "sha256": "..."}, ...},
     "external_weights": null | {"path": "/abs/path", "files": {"model.safetensors": 1234}}}

Reading it checks every listed file against its sha256 (these files are small) and
refuses a damaged or unlisted entry by name. :func:`materialize` builds a checkpoint
folder a replay can load (vLLM and transformers need one on disk) in the system's
temporary folder, never inside the recording: the copied files, plus the stored version-0
weights written as ``model.safetensors``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from replay.errors import BadInput, RecordingError
from replay.store.segments import sha256_file as _sha256

MODEL_DIR = "model"
MODEL_FILE = "model.json"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
MAX_FILE_BYTES = 64 * 2**20   # a "small file" worth copying: configs, tokenizers, templates


def _copied(src: Path) -> list[Path]:
    """The checkpoint's files a recording keeps: everything but the weights (and index files
    of sharded weights), top level only, each under :data:`MAX_FILE_BYTES`."""
    out = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        if p.stat().st_size <= MAX_FILE_BYTES:
            out.append(p)
    return out


def checkpoint_state_dict(path: str | os.PathLike) -> dict:
    """HF-named tensors of the ``*.safetensors`` files of the checkpoint folder ``path``."""
    from safetensors.torch import load_file

    p = Path(path)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise BadInput(f"{p} holds no *.safetensors weights", field="model_path")
    sd: dict = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def weight_files(src: Path) -> dict[str, int]:
    """The checkpoint's ``*.safetensors`` files and their sizes."""
    return {p.name: p.stat().st_size for p in sorted(src.glob("*.safetensors")) if p.is_file()}


def check_no_model(root: str | Path) -> None:
    """A BadInput when the recording at ``root`` already carries a model (one per run)."""
    path = Path(root) / MODEL_DIR / MODEL_FILE
    if path.is_file():
        raise BadInput(f"{root} already holds a model ({path}); record one model per run", field="model")


def write_model(root: str | Path, src: str | os.PathLike, *, weights_sha256: str | None,
                weights_version: int | None, store_weights: bool) -> dict:
    """Copy ``src``'s small files into ``root/model`` and write ``model.json`` last (a reader
    never sees a half-written model). Returns the ``model.json`` it wrote."""
    src, root = Path(src), Path(root)
    if not (src / "config.json").is_file():
        raise BadInput(f"{src} is not a HF-format checkpoint folder (no config.json)", field="model")
    dest = root / MODEL_DIR
    check_no_model(root)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=root))
    try:
        files = {}
        for p in _copied(src):
            shutil.copyfile(p, tmp / p.name)
            files[p.name] = {"size": (tmp / p.name).stat().st_size, "sha256": _sha256(tmp / p.name)}
        meta = {"format_version": FORMAT_VERSION, "source": str(src.resolve()),
                "weights_version": weights_version, "weights_sha256": weights_sha256, "files": files,
                "external_weights": None if store_weights else {"path": str(src.resolve()),
                                                                "files": weight_files(src)}}
        with open(tmp / MODEL_FILE, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def stored_model(root: str | Path) -> dict | None:
    """The recording's ``model/model.json`` with every listed file checked, or None when the
    recording carries no model. A damaged entry is a :class:`RecordingError` naming the file."""
    folder = Path(root) / MODEL_DIR
    path = folder / MODEL_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        files = meta["files"]
        assert isinstance(files, dict) and meta.get("format_version") == FORMAT_VERSION
    except Exception:
        raise RecordingError(f"{path} is damaged (not the model list this version writes); "
                             "pass --model PATH to replay with a checkpoint of your own", "damaged model") from None
    for name, entry in files.items():
        p = folder / name
        if Path(name).name != name or not p.is_file():
            raise RecordingError(f"{path} lists {name!r}, which is not in {folder}", "damaged model")
        if p.stat().st_size != entry.get("size") or _sha256(p) != entry.get("sha256"):
            raise RecordingError(f"{p} does not match its recorded size and sha256 (changed after "
                                 "recording); pass --model PATH to replay with a checkpoint of your own",
                                 "damaged model")
    return meta


def materialize(root: str | Path, load_weights: Any) -> Path:
    """A checkpoint folder for the recording's stored model (see module doc), built once per
    model in the temporary folder and reused. ``load_weights(version)`` returns the state dict
    of a stored weight version (``Recording.load_weights``)."""
    root = Path(root)
    meta = stored_model(root)
    if meta is None:
        raise RecordingError(f"{root} carries no model", "no model")
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    out = Path(tempfile.gettempdir()) / "replay-models" / key
    ext = meta.get("external_weights")
    if ext:
        _check_external(ext)
    if (out / ".complete").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out.parent))
    try:
        for name in meta["files"]:
            shutil.copyfile(root / MODEL_DIR / name, tmp / name)
        if ext:
            for name in ext["files"]:
                os.symlink(Path(ext["path"]) / name, tmp / name)
        else:
            from safetensors.torch import save_file

            sd = load_weights(int(meta["weights_version"]))
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"))
        (tmp / ".complete").write_text(str(root))
        try:
            os.replace(tmp, out)
        except OSError:   # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_external(ext: dict) -> None:
    src = Path(ext["path"])
    now = weight_files(src) if src.is_dir() else {}
    if not ext["files"] or now != ext["files"]:
        raise RecordingError(f"the recording names its model's weights at {src} (not stored in it), and they "
                             "are not there as recorded; pass --model PATH to replay with that checkpoint",
                             "no model weights")
