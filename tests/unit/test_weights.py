"""The weight store: safetensors codec, content addressing, XOR deltas, corrupt blobs."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from replay.errors import BadInput, RecordingError
from replay.store.weights import (BLOBS_DIR, WeightStore, deserialize_state_dict,
                            serialize_state_dict, sha256_of)

ROOT = Path(__file__).resolve().parents[2]


def _numpy_sd(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.w": rng.standard_normal((16, 8)).astype(np.float32),
        "layers.0.b": rng.standard_normal(8).astype(np.float16),
        "head": rng.standard_normal((3, 5)),  # float64
        "ids": rng.integers(-2**40, 2**40, size=7),  # int64
        "i32": rng.integers(-1000, 1000, size=(2, 3)).astype(np.int32),
        "i16": rng.integers(-1000, 1000, size=4).astype(np.int16),
        "i8": rng.integers(-100, 100, size=5).astype(np.int8),
        "u8": rng.integers(0, 255, size=3).astype(np.uint8),
        "mask": rng.random(6) > 0.5,
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _torch_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": torch.randn(10, 6, generator=g, dtype=torch.bfloat16),
        "w": torch.randn(6, 6, generator=g),
        "h": torch.randn(4, generator=g, dtype=torch.float16),
        "d": torch.randn(3, generator=g, dtype=torch.float64),
        "steps": torch.arange(5, dtype=torch.int64),
        "flag": torch.tensor([True, False, True]),
        "small": torch.tensor([-3, 7], dtype=torch.int8),
    }


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = torch.as_tensor(a[k]), torch.as_tensor(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), k


# ---------------------------------------------------------------- codec

def test_real_safetensors_reads_our_bytes_for_every_dtype():
    sd = _numpy_sd()
    got = st_load(serialize_state_dict(sd))
    _assert_same(got, {k: torch.from_numpy(v) for k, v in sd.items()})
    tsd = _torch_sd()
    _assert_same(st_load(serialize_state_dict(tsd)), tsd)


def test_we_read_bytes_written_by_real_safetensors():
    tsd = _torch_sd(3)
    _assert_same(deserialize_state_dict(st_save(tsd), framework="torch"), tsd)


def test_numpy_framework_gives_bf16_as_uint16_bits():
    tsd = _torch_sd(1)
    arrays = deserialize_state_dict(serialize_state_dict(tsd), framework="numpy")
    assert arrays["embed"].dtype == np.uint16
    assert np.array_equal(arrays["embed"], tsd["embed"].view(torch.int16).numpy().view(np.uint16))
    assert arrays["w"].dtype == np.float32 and np.array_equal(arrays["w"], tsd["w"].numpy())
    arrays["w"][0, 0] = 1.0  # returned arrays are writable


def test_bytes_are_deterministic_and_independent_of_order_and_layout():
    sd = _numpy_sd()
    reordered = dict(reversed(list(sd.items())))
    assert serialize_state_dict(sd) == serialize_state_dict(reordered)
    big_endian = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in sd.items()}
    fortran = {k: (np.asfortranarray(v) if v.ndim == 2 else v) for k, v in sd.items()}
    assert not fortran["layers.0.w"].flags.c_contiguous
    assert serialize_state_dict(big_endian) == serialize_state_dict(sd)
    assert serialize_state_dict(fortran) == serialize_state_dict(sd)
    tsd = _torch_sd()
    noncontig = {k: (v.t().contiguous().t() if v.dim() == 2 else v) for k, v in tsd.items()}
    assert serialize_state_dict(noncontig) == serialize_state_dict(tsd)
    data = serialize_state_dict(sd)
    assert sha256_of(sd) == hashlib.sha256(data).hexdigest()
    assert (8 + int.from_bytes(data[:8], "little")) % 8 == 0  # data section aligned


def test_unaligned_tensors_from_another_writer_are_read():
    # hand-made file: I8[3] first, then F32[2] at data offset 3 (not 4-byte aligned)
    header = (b'{"a":{"dtype":"I8","shape":[3],"data_offsets":[0,3]},'
              b'"b":{"dtype":"F32","shape":[2],"data_offsets":[3,11]}}')
    body = np.array([1, -2, 3], np.int8).tobytes() + np.array([1.5, -2.25], "<f4").tobytes()
    data = len(header).to_bytes(8, "little") + header + body
    got = deserialize_state_dict(data, framework="torch")
    assert got["a"].tolist() == [1, -2, 3] and got["b"].tolist() == [1.5, -2.25]


@pytest.mark.parametrize("bad, what", [
    ({"x": np.zeros(2, np.complex64)}, "complex64"),
    ({"x": np.zeros(2, np.uint32)}, "uint32"),
    ({"x": [1.0, 2.0]}, "list"),
    ({3: np.zeros(2)}, "3"),
    ({"x": torch.zeros(2, dtype=torch.complex64)}, "complex64"),
])
def test_unsupported_values_are_bad_input(bad, what):
    with pytest.raises(BadInput, match=what):
        serialize_state_dict(bad)


@pytest.mark.parametrize("data", [
    b"", b"\x05\x00\x00\x00", (10**9).to_bytes(8, "little") + b"{}",
    (4).to_bytes(8, "little") + b"nope",
    (2).to_bytes(8, "little") + b"[]",
    (60).to_bytes(8, "little") + b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}    ',
    (52).to_bytes(8, "little") + b'{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}}' + bytes(4),
])
def test_malformed_safetensors_is_a_recording_error(data):
    with pytest.raises(RecordingError, match="my-source"):
        deserialize_state_dict(data, source="my-source")


def test_importing_and_numpy_use_do_not_import_torch():
    code = ("import sys, numpy as np\n"
            "import replay.store.weights as w, replay.metrics as m\n"
            "w.sha256_of({'a': np.ones(3, np.float32)})\n"
            "m.token_metrics([0.0, -1.0], [0.0, -1.1])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------- store

def test_put_and_load_full_blob(tmp_path):
    store = WeightStore(tmp_path)
    tsd = _torch_sd()
    entry = store.put(tsd)
    assert entry["sha256"] == sha256_of(tsd)
    assert entry["blob"] == f"{BLOBS_DIR}/{entry['sha256']}.zst"
    assert entry["base_sha256"] is None and entry["fallback"] is None
    assert entry["nbytes"] == len(serialize_state_dict(tsd))
    assert entry["stored_bytes"] == (tmp_path / entry["blob"]).stat().st_size
    _assert_same(store.load(entry["blob"], entry["sha256"]), tsd)
    arrays = WeightStore(tmp_path).load(entry["blob"], entry["sha256"], framework="numpy")
    assert arrays["embed"].dtype == np.uint16 and arrays["w"].dtype == np.float32


def test_same_content_is_stored_once(tmp_path):
    store = WeightStore(tmp_path)
    first = store.put(_numpy_sd())
    path = tmp_path / first["blob"]
    mtime = path.stat().st_mtime_ns
    again = store.put(dict(reversed(list(_numpy_sd().items()))))
    assert again == first and path.stat().st_mtime_ns == mtime
    # a delta request for a version already stored returns the stored blob
    assert store.put(_numpy_sd(), base_sha256=first["sha256"]) == first
    assert sorted(p.name for p in (tmp_path / BLOBS_DIR).iterdir()) == [path.name]


def _adamw_like(sd: dict[str, np.ndarray], frac: float, seed: int) -> dict[str, np.ndarray]:
    """A copy of ``sd`` where a fraction ``frac`` of float32 entries moved by ~1e-4 relative."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in sd.items():
        w = v.copy()
        flat = w.reshape(-1)
        idx = rng.random(flat.size) < frac
        flat[idx] -= (1e-4 * np.sign(flat[idx]) * np.abs(flat[idx])).astype(w.dtype)
        out[k] = w
    return out


def test_xor_delta_is_much_smaller_than_a_full_blob(tmp_path):
    rng = np.random.default_rng(0)
    v0 = {f"layers.{i}.w": rng.standard_normal((256, 256)).astype(np.float32) for i in range(4)}
    v1 = _adamw_like(v0, frac=0.01, seed=1)
    store = WeightStore(tmp_path)
    e0 = store.put(v0)
    e1 = store.put(v1, base_sha256=e0["sha256"])
    assert e1["base_sha256"] == e0["sha256"] and e1["fallback"] is None
    assert e1["blob"] == f"{BLOBS_DIR}/{e1['sha256']}.xor-{e0['sha256']}.zst"
    ratio = e1["stored_bytes"] / e0["stored_bytes"]
    assert ratio < 0.5, ratio
    got = WeightStore(tmp_path).load(e1["blob"], e1["sha256"], framework="numpy")
    assert all(np.array_equal(got[k], v1[k]) for k in v1)


def test_delta_chain_loads_and_is_bounded(tmp_path):
    rng = np.random.default_rng(5)
    versions = [{"w": rng.standard_normal((64, 64)).astype(np.float32)}]
    for i in range(4):
        versions.append(_adamw_like(versions[-1], frac=0.05, seed=i))
    store = WeightStore(tmp_path, max_chain=2)
    entries = [store.put(versions[0])]
    for v in versions[1:]:
        entries.append(store.put(v, base_sha256=entries[-1]["sha256"]))
    assert [e["base_sha256"] is None for e in entries] == [True, False, False, True, False]
    assert "max_chain=2" in entries[3]["fallback"]
    fresh = WeightStore(tmp_path)  # no cached bytes: every chain is read from disk
    assert [fresh.chain_depth(e["blob"]) for e in entries] == [0, 1, 2, 0, 1]
    for e, v in zip(entries, versions):
        assert np.array_equal(fresh.load(e["blob"], e["sha256"], framework="numpy")["w"], v["w"])


def test_delta_blob_is_the_same_whether_the_base_comes_from_memory_or_disk(tmp_path):
    v0 = {"w": np.random.default_rng(2).standard_normal((32, 32)).astype(np.float32)}
    v1 = _adamw_like(v0, 0.1, 3)
    warm = WeightStore(tmp_path / "a")
    b0 = warm.put(v0)["sha256"]
    e_warm = warm.put(v1, base_sha256=b0)
    WeightStore(tmp_path / "b").put(v0)
    e_cold = WeightStore(tmp_path / "b").put(v1, base_sha256=b0)
    assert e_warm["blob"] == e_cold["blob"]
    assert (tmp_path / "a" / e_warm["blob"]).read_bytes() == \
        (tmp_path / "b" / e_cold["blob"]).read_bytes()


def test_a_bad_version_inside_a_chain_is_named(tmp_path):
    rng = np.random.default_rng(4)
    v = [{"w": rng.standard_normal(256).astype(np.float32)}]
    v += [_adamw_like(v[0], 0.2, 1)]
    v += [_adamw_like(v[1], 0.2, 2)]
    store = WeightStore(tmp_path)
    e = [store.put(v[0])]
    e += [store.put(v[1], base_sha256=e[0]["sha256"])]
    e += [store.put(v[2], base_sha256=e[1]["sha256"])]
    # replace the middle delta by a valid zstd frame of the wrong XOR
    wrong = WeightStore(tmp_path / "other")
    w0 = wrong.put(v[0])
    w1 = wrong.put(_adamw_like(v[0], 0.5, 9), base_sha256=w0["sha256"])
    os.replace(tmp_path / "other" / w1["blob"], tmp_path / e[1]["blob"])
    with pytest.raises(RecordingError, match=f"{e[1]['sha256']}.xor.*hashes to"):
        WeightStore(tmp_path).load(e[2]["blob"], e[2]["sha256"])


def test_delta_with_other_shapes_falls_back_to_full(tmp_path):
    store = WeightStore(tmp_path)
    e0 = store.put({"w": np.ones((4, 4), np.float32)})
    e1 = store.put({"w": np.ones((4, 5), np.float32)}, base_sha256=e0["sha256"])
    assert e1["base_sha256"] is None and "stored in full" in e1["fallback"]
    assert e1["blob"] == f"{BLOBS_DIR}/{e1['sha256']}.zst"
    assert store.load(e1["blob"], e1["sha256"], framework="numpy")["w"].shape == (4, 5)


def test_unknown_base_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not in the weight store"):
        WeightStore(tmp_path).put({"w": np.ones(3)}, base_sha256="a" * 64)


def test_concurrent_puts_are_safe(tmp_path):
    store = WeightStore(tmp_path)
    sds = [{"w": np.full((32, 32), i % 4, np.float32)} for i in range(16)]
    results: list[dict] = [None] * len(sds)
    errors: list[BaseException] = []

    def work(i):
        try:
            results[i] = store.put(sds[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    names = sorted(p.name for p in (tmp_path / BLOBS_DIR).iterdir())
    assert len(names) == 4 and not any(n.endswith(".tmp") for n in names)
    for sd, e in zip(sds, results):
        assert np.array_equal(store.load(e["blob"], e["sha256"], framework="numpy")["w"], sd["w"])


# ---------------------------------------------------------------- bad blobs

@pytest.fixture
def stored(tmp_path):
    store = WeightStore(tmp_path)
    v0 = {"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
    e0 = store.put(v0)
    e1 = store.put(_adamw_like(v0, 0.1, 1), base_sha256=e0["sha256"])
    return WeightStore(tmp_path), e0, e1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("damage", ["truncate", "flip", "append", "empty", "garbage"])
def test_corrupt_blob_is_a_recording_error(stored, damage):
    store, e0, _ = stored
    path = store.root / e0["blob"]
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    elif damage == "append":
        raw += b"\x00junk"
    elif damage == "empty":
        raw = bytearray()
    else:
        raw = bytearray(os.urandom(len(raw)))
    path.write_bytes(bytes(raw))
    with pytest.raises(RecordingError, match=e0["sha256"][:12]):
        store.load(e0["blob"], e0["sha256"])


def test_sha_mismatch_names_the_blob(stored):
    store, e0, _ = stored
    other = store.put({"w": np.zeros(3, np.float32)})
    os.replace(store.root / other["blob"], store.root / e0["blob"])
    with pytest.raises(RecordingError, match="hashes to"):
        store.load(e0["blob"], e0["sha256"])
    with pytest.raises(RecordingError, match="hashes to"):
        store.load_bytes(other["blob"].replace(other["sha256"], e0["sha256"]), "b" * 64)


def test_missing_blob_and_missing_base(stored):
    store, e0, e1 = stored
    with pytest.raises(RecordingError, match="missing"):
        store.load(f"{BLOBS_DIR}/{'c' * 64}.zst", "c" * 64)
    (store.root / e0["blob"]).unlink()
    with pytest.raises(RecordingError, match=f"delta against {e0['sha256']}"):
        store.load(e1["blob"], e1["sha256"])


def test_blob_paths_outside_the_recording_are_refused(stored, tmp_path_factory):
    store, e0, _ = stored
    outside = tmp_path_factory.mktemp("outside")
    (outside / e0["blob"].split("/")[-1]).write_bytes((store.root / e0["blob"]).read_bytes())
    for blob in [str(outside / e0["blob"].split("/")[-1]), f"../{outside.name}/x.zst",
                 f"{BLOBS_DIR}/../../../{outside.name}/{e0['sha256']}.zst"]:
        with pytest.raises(RecordingError, match="outside the recording"):
            store.load(blob, e0["sha256"])
    link = store.root / BLOBS_DIR / f"{'d' * 64}.zst"
    link.symlink_to(outside / e0["blob"].split("/")[-1])
    with pytest.raises(RecordingError, match="symlink"):
        store.load(f"{BLOBS_DIR}/{link.name}", e0["sha256"])


def test_badly_named_blob_is_refused(stored):
    store, e0, _ = stored
    renamed = store.root / BLOBS_DIR / "weights.bin"
    renamed.write_bytes((store.root / e0["blob"]).read_bytes())
    with pytest.raises(RecordingError, match="unknown name"):
        store.load(f"{BLOBS_DIR}/weights.bin", e0["sha256"])


def test_cyclic_delta_chain_is_refused(tmp_path):
    a, b = "a" * 64, "b" * 64
    blobs = tmp_path / BLOBS_DIR
    blobs.mkdir(parents=True)
    (blobs / f"{a}.xor-{b}.zst").write_bytes(b"x")
    (blobs / f"{b}.xor-{a}.zst").write_bytes(b"x")
    with pytest.raises(RecordingError, match="cyclic"):
        WeightStore(tmp_path).load(f"{BLOBS_DIR}/{a}.xor-{b}.zst", a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_stored_like_cpu_ones(tmp_path):
    tsd = _torch_sd()
    cuda = {k: v.cuda() for k, v in tsd.items()}
    assert serialize_state_dict(cuda) == serialize_state_dict(tsd)
    e = WeightStore(tmp_path).put(cuda)
    _assert_same(WeightStore(tmp_path).load(e["blob"], e["sha256"]), tsd)
