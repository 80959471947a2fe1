"""Hugging Face safetensors checkpoints: an index and its shards, read lazily through mmap.

The format is small enough to read directly (8-byte header length, JSON header, raw data), which
lets every check name the file and the tensor: missing or truncated shards, tensors the index
points at but the shard lacks, shapes and dtypes that do not match the config, NaN FP8 codes.
Tensors come back as numpy arrays that view the mapped file (no copy): BF16 as uint16 bits,
FP8 E4M3 as uint8 codes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from refmoe.kernels import formats

# safetensors dtype -> (numpy dtype of the view, the name refmoe uses)
DTYPES = {
    "F64": (np.float64, "float64"),
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "F8_E4M3": (np.uint8, "float8_e4m3fn"),
    "F8_E8M0": (np.uint8, "float8_e8m0fnu"),  # power-of-two scales: 2^(code - 127)
    "I64": (np.int64, "int64"),
    "I32": (np.int32, "int32"),
    "I16": (np.int16, "int16"),
    "I8": (np.int8, "int8"),
    "U8": (np.uint8, "uint8"),
    "BOOL": (np.bool_, "bool"),
}


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_header(path: Path, header, data_size: int) -> tuple[dict, dict]:
    """(metadata, entries) of a safetensors header, checked whole before anything is mapped:
    an object; each entry an object with a known dtype, a shape of non-negative integers and
    data_offsets [begin, end] inside the data section, holding exactly dtype x shape bytes;
    no two tensors sharing a byte. Every error names the file and the tensor."""
    if not isinstance(header, dict):
        raise ValueError(
            f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}"
        )
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: __metadata__ must be an object of strings")
    entries, spans = {}, []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: its header entry must be an object, got {type(e).__name__}")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"{where} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ValueError(
                f"{where}: shape must be a list of non-negative integers, got {shape!r:.80}"
            )
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise ValueError(
                f"{where}: data_offsets must be [begin, end] with 0 <= begin <= "
                f"end, got {offsets!r:.80}"
            )
        begin, end = offsets
        itemsize = np.dtype(DTYPES[dtype][0]).itemsize
        want = itemsize
        for d in shape:
            want *= d
        if end - begin != want:
            raise ValueError(
                f"{where} holds {end - begin} bytes, its shape {shape} and dtype "
                f"{dtype} need {want}"
            )
        if end > data_size:
            raise ValueError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the "
                f"data section, which holds {data_size}"
            )
        entries[name] = e
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ValueError(
                f"{path}: tensors {a!r} and {b!r} overlap (bytes {begin_b}-"
                f"{end_a} of the data section)"
            )
    return metadata, entries


class Shard:
    """One .safetensors file: its header, and its tensors as views of one read-only mmap."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ValueError(f"{path}: shard not found") from None
        except OSError as e:  # a symlink loop, no permission
            raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
        if not path.is_file():
            raise ValueError(f"{path}: not a file")
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError(
                    f"{path}: truncated or not safetensors (header of {n} bytes, file of {size})"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        data_start, data_size = 8 + n, size - 8 - n
        self.metadata, self.entries = _check_header(path, header, data_size)
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else None
        self._data_start = data_start

    def dtype(self, name: str) -> str:
        return DTYPES[self.entries[name]["dtype"]][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def array(self, name: str) -> np.ndarray:
        e = self.entries[name]
        np_dtype = DTYPES[e["dtype"]][0]
        begin, end = e["data_offsets"]
        if self._map is None:  # an empty file holds no tensor (the header check said so)
            raise ValueError(f"{self.path}: tensor {name!r} has no data")
        raw = self._map[self._data_start + begin : self._data_start + end]
        return raw.view(np_dtype).reshape(e["shape"])


class Checkpoint:
    """A model directory's weights: model.safetensors.index.json and shards, or one file."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                doc = json.loads(index.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
            except OSError as e:
                raise ValueError(f"{index}: cannot be read ({e.strerror or e})") from None
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise ValueError(
                    f"{index}: field 'weight_map' must be an object of tensor name -> shard file"
                )
            for f in set(weight_map.values()):
                if Path(f).name != f or f in (".", ".."):
                    raise ValueError(f"{index}: shard {f!r} must be a file in the model directory")
        elif (self.dir / "model.safetensors").exists():
            weight_map = None
        else:
            raise ValueError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.shards = {f: Shard(self.dir / f) for f in files}
        if weight_map is None:
            weight_map = {n: "model.safetensors" for n in self.shards["model.safetensors"].entries}
        for name, f in weight_map.items():
            if name not in self.shards[f].entries:
                raise ValueError(f"{self.dir / f}: tensor {name!r} listed in the index is missing")
        self.weight_map = weight_map
        self.stored: dict[str, str] = {}  # a name read by -> the name in the file (see alias)
        self.nbytes = sum(s.path.stat().st_size for s in self.shards.values())
        # the block one FP8 scale covers, and whether the config names none (a lone stored
        # scale is then the tensor's), from config.json's quantization_config where it has one
        self.fp8_block, self.fp8_block_default = _fp8_block_of(self.dir)

    def fp8_scales(self, weight: str, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """The scales of FP8 weight `weight` [n, k] as the FP8 kernels take them, with the block
        one scale covers: float32 [ceil(n/bn), ceil(k/bk)] and (bn, bk) = fp8_block (set from
        the config: DeepSeek's weight_block_size of any size, compressed-tensors' block,
        channel (1, WHOLE) or tensor (WHOLE, WHOLE) strategy). Read as stored, with no
        repetition: `weight`_scale_inv (DeepSeek) or `weight`_scale (compressed-tensors,
        AutoFP8), float32, bfloat16 or float16 (exact in float32) or E8M0 codes (decoded
        exactly; 0xFF, NaN, refused). A single stored scale ([], [1] or [1, 1]) is the
        tensor's where the config gives no block (AutoFP8's per-tensor FP8)."""
        n, k = shape
        block = self.fp8_block
        name = weight + "_scale_inv"
        if name not in self and weight + "_scale" in self:
            name = weight + "_scale"
        dtypes = ("float32", "float8_e8m0fnu", "bfloat16", "float16")
        stored = formats.scale_shape(n, k, block)
        lone = name in self and self.shape(name) in ((), (1,), (1, 1))
        if lone and (self.fp8_block_default or stored == (1, 1)):
            if self.fp8_block_default:
                block = (formats.WHOLE, formats.WHOLE)
            s = np.asarray(self.get(name, None, dtypes)).reshape(1, 1)
        else:
            s = self.get(name, stored, dtypes)
        dtype = self.dtype(name)
        if dtype == "float8_e8m0fnu":
            bad = s == 0xFF
            if bad.any():
                idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
                raise ValueError(
                    f"{self._shard(name).path}: tensor {name!r}: NaN E8M0 scale at index {idx}"
                )
            s = np.ldexp(np.float32(1), s.astype(np.int32) - 127).astype(np.float32)
        elif dtype == "bfloat16":  # checked finite by get
            s = formats.bf16_decode(s).astype(np.float32)
        return np.ascontiguousarray(s, np.float32), block

    def check_fits(self, memory_bytes: int) -> None:
        """Refuse a model whose weights exceed the machine's memory: mapped pages would be
        evicted and re-read from disk for every token."""
        if self.nbytes > memory_bytes:
            raise ValueError(
                f"{self.dir}: the weights take {self.nbytes / 2**30:.1f} GiB, more "
                f"than this machine's {memory_bytes / 2**30:.1f} GiB of memory"
            )

    def alias(self, stored: str, seen: str) -> int:
        """Read tensors stored under the prefix `stored` by the prefix `seen` (Qwen3.5 keeps
        its text model under model.language_model., the family code reads model.); a name
        stored both ways is refused (which copy is the model's would be a guess). Errors still
        name a tensor as the file holds it. Returns how many names were aliased."""
        return self.rename(
            lambda name: seen + name[len(stored) :] if name.startswith(stored) else name,
            f"under {stored!r}",
        )

    def rename(self, seen_as, how: str = "under another name") -> int:
        """Read every stored tensor by the name seen_as(its stored name) gives (a release's
        own names read by the family code's); a name stored both ways, or two stored names
        read as one, is refused. Errors still name a tensor as the file holds it. Returns
        how many names changed."""
        moved: dict[str, str] = {}
        for name in self.weight_map:
            new = seen_as(name)
            if new != name:
                if new in moved:
                    raise ValueError(
                        f"{self.dir}: tensors {moved[new]!r} and {name!r} are both read as "
                        f"{new!r}; a checkpoint holds one copy"
                    )
                moved[new] = name
        clash = sorted(set(moved) & (set(self.weight_map) - set(moved.values())))
        if clash:
            raise ValueError(
                f"{self.dir}: tensor {clash[0]!r} is stored both as itself and {how} "
                f"({moved[clash[0]]!r}); a checkpoint holds one copy"
            )
        shards = {old: self.weight_map.pop(old) for old in moved.values()}
        for new, old in moved.items():
            self.weight_map[new] = shards[old]
            self.stored[new] = self.stored.pop(old, old)
        return len(moved)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _shard(self, name: str) -> Shard:
        try:
            return self.shards[self.weight_map[name]]
        except KeyError:
            raise ValueError(f"{self.dir}: tensor {name!r} not found in the checkpoint") from None

    def dtype(self, name: str) -> str:
        return self._shard(name).dtype(self.stored.get(name, name))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).shape(self.stored.get(name, name))

    def get(
        self, name: str, shape: tuple[int, ...] | None = None, dtypes: tuple[str, ...] | None = None
    ) -> np.ndarray:
        """The tensor as a read-only view of the mapped shard, checked against the expected
        shape and dtypes (names as in DTYPES)."""
        shard, name = self._shard(name), self.stored.get(name, name)
        where = f"{shard.path}: tensor {name!r}"
        if shape is not None and shard.shape(name) != tuple(shape):
            raise ValueError(
                f"{where} has shape {list(shard.shape(name))}, the config needs {list(shape)}"
            )
        if dtypes is not None and shard.dtype(name) not in dtypes:
            raise ValueError(
                f"{where} has dtype {shard.dtype(name)}, expected one of {', '.join(dtypes)}"
            )
        a = shard.array(name)
        bf16 = shard.dtype(name) == "bfloat16"
        if name.endswith(("_scale_inv", "_scale", "_scale_2")) and (a.dtype.kind == "f" or bf16):
            values = formats.bf16_decode(a) if bf16 else a
            bad = ~np.isfinite(values)
            if bad.any():
                idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
                raise ValueError(f"{where}: {values[idx]} at index {idx}; a scale must be finite")
        if shard.dtype(name) == "float8_e4m3fn":
            bad = (a & 0x7F) == 0x7F
            if bad.any():
                idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
                raise ValueError(
                    f"{where}: NaN FP8 code at index {idx}; checkpoints never hold NaN"
                )
        return a


def _fp8_block_of(directory: Path) -> tuple[tuple[int, int], bool]:
    """(block, named by no config) for the FP8 scales of the checkpoint in `directory`, from its
    config.json; (128, 128) where it has none or it is not FP8 (ModelConfig names the errors of
    a malformed one)."""
    from refmoe.config import fp8_scheme

    try:
        q = json.loads((directory / "config.json").read_text()).get("quantization_config")
        return fp8_scheme(q if isinstance(q, dict) else None)
    except (OSError, ValueError, AttributeError):
        return (128, 128), True


def save_file(
    tensors: dict[str, np.ndarray], path: str | Path, dtypes: dict[str, str] | None = None
) -> None:
    """Write numpy arrays as a safetensors file (for tests and `refmoe demo`); dtypes names the
    safetensors dtype where the numpy one is ambiguous (BF16 bits, F8_E4M3 codes)."""
    dtypes = dtypes or {}
    by_numpy = {np.dtype(v[0]): k for k, v in DTYPES.items() if k not in ("BF16", "F8_E4M3")}
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        st = dtypes.get(name) or by_numpy[a.dtype]
        header[name] = {
            "dtype": st,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        blobs.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in blobs:
            f.write(a.tobytes())
