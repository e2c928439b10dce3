"""Checkpoint readers: safetensors, PyTorch ``.bin`` and GGUF, one tensor at a time.

``iterate_weights(path)`` yields ``(name, tensor)`` pairs with the names exactly as stored in the
file; the iterator it returns (``CheckpointWeights``) also tells which file the latest tensor came
from (``current_file``), so that loaders can name it in their errors. Mapping the names to a
model's parameter names (e.g. GGUF ``blk.0.attn_q.weight`` to HF
``model.layers.0.self_attn.q_proj.weight``) is the model's job.

- safetensors: ``safetensors.safe_open`` memory-maps each file; tensors keep their stored dtype.
- ``.bin``: ``torch.load(..., weights_only=True, mmap=True)`` (zip format; legacy non-zip pickles
  are loaded without mmap); tensors keep their stored dtype.
- GGUF: parsed once per file (``gguf_file``: header, metadata and tensor table, cached while the
  file is unchanged) and memory-mapped; every floating-point or quantized tensor is returned as
  float32 in PyTorch dimension order (F32 tensors are views of the copy-on-write map, other types
  are dequantized by the ``gguf`` package). GGUF stores dimensions fastest-varying
  first, so ``torch shape == tuple(reversed(reader_tensor.shape))``: the token embedding of a
  model with vocabulary V and hidden size H is listed as ``[H, V]`` and returned as ``(V, H)``,
  a linear layer ``out x in`` as ``(out, in)`` like ``nn.Linear.weight``. No other transform is
  applied: llama.cpp's converter permutes the rows of LLaMA ``attn_q`` / ``attn_k`` weights
  (rotary pairs interleaved instead of split in halves), and undoing that is the model's job too.

Corrupt or truncated files raise ``CheckpointError("cannot read checkpoint file <file>: <reason>")``
(a ``ValueError``, see ``cacheflow_runtime.errors``), as do malformed index files and folders
without a checkpoint; a missing path or a missing shard raises ``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from cacheflow_runtime.errors import CheckpointError

__all__ = [
    "FORMATS",
    "CheckpointWeights",
    "GGUFFile",
    "GGUFTensorInfo",
    "checkpoint_files",
    "detect_format",
    "gguf_file",
    "gguf_torch_shape",
    "iterate_weights",
    "read_gguf_metadata",
]

PathLike = str | os.PathLike[str]
WeightIterator = Iterator[tuple[str, torch.Tensor]]

#: The checkpoint formats this module reads.
FORMATS = ("safetensors", "bin", "gguf")

# ``*.bin`` files that HF training runs leave next to the weights and that hold no weights.
_NON_WEIGHT_BIN_FILES = frozenset({"training_args.bin", "optimizer.bin", "scheduler.bin"})

_SINGLE_FILE = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}
# Weight files of frameworks we do not read, to say what was found instead.
_FOREIGN_SUFFIXES = {".msgpack": "a Flax checkpoint", ".h5": "a TensorFlow/Keras checkpoint",
                     ".onnx": "an ONNX model"}
_SUFFIX = {"safetensors": ".safetensors", "bin": ".bin", "gguf": ".gguf"}


# --------------------------------------------------------------------------------------------
# Paths, formats and shards
# --------------------------------------------------------------------------------------------


def _existing(path: PathLike) -> Path:
    """``path`` as a ``Path``, or ``FileNotFoundError`` naming it when it does not exist."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {p}")
    return p


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def _format_of_file(file: Path) -> str | None:
    """The format a single file's name implies, or None."""
    name = file.name
    if name.endswith((".safetensors", ".safetensors.index.json")):
        return "safetensors"
    if name.endswith((".bin", ".bin.index.json", ".pt", ".pth")):
        return "bin"
    if name.endswith(".gguf"):
        return "gguf"
    return None


def _weight_files(directory: Path, fmt: str) -> list[Path]:
    """The weight files of one format directly inside ``directory``, sorted by name."""
    suffix = _SUFFIX[fmt]
    return sorted(
        p
        for p in directory.iterdir()
        if p.name.endswith(suffix) and p.is_file() and p.name not in _NON_WEIGHT_BIN_FILES
    )


def _index_files(directory: Path, fmt: str) -> list[Path]:
    """The ``*.safetensors.index.json`` / ``*.bin.index.json`` files inside ``directory``."""
    suffix = _SUFFIX[fmt] + ".index.json"
    return sorted(p for p in directory.iterdir() if p.name.endswith(suffix) and p.is_file())


def _describe_contents(directory: Path, limit: int = 20) -> str:
    """A short listing of a directory for error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    if not names:
        return "the directory is empty"
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"found {shown}{more}"


def detect_format(path: PathLike) -> str:
    """The checkpoint format at ``path``: ``"safetensors"``, ``"bin"`` or ``"gguf"``.

    ``path`` is a checkpoint file (``*.safetensors``, ``*.bin``/``*.pt``/``*.pth``, ``*.gguf`` or
    an ``*.index.json`` of the first two) or a directory. In a directory safetensors wins over
    ``.bin`` (as in HF ``from_pretrained``), and GGUF is chosen only when the directory holds
    neither and exactly one ``*.gguf`` file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: nothing recognisable is there, or several GGUF files make it ambiguous.
    """
    p = _existing(path)
    if p.is_file():
        fmt = _format_of_file(p)
        if fmt is None:
            raise ValueError(
                f"cannot tell the checkpoint format of {p}: expected *.safetensors, *.bin or *.gguf"
            )
        return fmt
    for fmt in ("safetensors", "bin"):
        if _weight_files(p, fmt) or _index_files(p, fmt):
            return fmt
    ggufs = _weight_files(p, "gguf")
    if len(ggufs) == 1:
        return "gguf"
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise ValueError(f"several GGUF files in {p} ({names}): pass the file to load")
    foreign = [f"{f.name} is {_FOREIGN_SUFFIXES[f.suffix]}" for f in sorted(p.iterdir())
               if f.suffix in _FOREIGN_SUFFIXES]
    hint = f"; {', '.join(foreign)}, which cacheflow does not read: convert it to safetensors" \
        if foreign else ""
    raise CheckpointError(
        f"no checkpoint found in {p}: expected *.safetensors, *.bin or *.gguf "
        f"({_describe_contents(p)}){hint}", file=p
    )


def _shards_from_index(index: Path) -> list[Path]:
    """The shard files an HF ``*.index.json`` names in its ``weight_map`` (sorted, unique)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint index {index}: {exc}",
                              file=index) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"cannot read checkpoint index {index}: expected a 'weight_map' object mapping "
            "tensor names to shard file names", file=index
        )
    if not weight_map:
        raise CheckpointError(f"checkpoint index {index} names no shards (empty 'weight_map')",
                              file=index)
    shards = []
    for shard in sorted(set(weight_map.values())):
        file = index.parent / shard
        if not file.is_file():
            raise FileNotFoundError(
                f"checkpoint index {index} names shard {shard!r}, which does not exist ({file})"
            )
        shards.append(file)
    return shards


def checkpoint_files(path: PathLike, fmt: str) -> list[Path]:
    """The files to read for a checkpoint of format ``fmt`` at ``path``.

    A file is returned as is, except an ``*.index.json``, which stands for the shards its
    ``weight_map`` names. In a directory the lookup follows HF: the single-file name
    (``model.safetensors`` / ``pytorch_model.bin``), then ``model.safetensors.index.json`` /
    ``pytorch_model.bin.index.json`` (or the one other index of that format), then every file of
    the format. GGUF directories must hold exactly one ``*.gguf``.

    Raises:
        FileNotFoundError: ``path``, or a shard an index names, does not exist; or the directory
            holds no file of the format.
        ValueError: ``fmt`` is unknown, an index is malformed, or the choice is ambiguous.
    """
    _check_format(fmt)
    p = _existing(path)
    if p.is_file():
        return _shards_from_index(p) if p.name.endswith(".index.json") else [p]

    if fmt != "gguf":
        single = p / _SINGLE_FILE[fmt]
        if single.is_file():
            return [single]
        default_index = p / (_SINGLE_FILE[fmt] + ".index.json")
        if default_index.is_file():
            return _shards_from_index(default_index)
        indices = _index_files(p, fmt)
        if len(indices) == 1:
            return _shards_from_index(indices[0])
        if len(indices) > 1:
            names = ", ".join(i.name for i in indices)
            raise ValueError(f"several {fmt} index files in {p} ({names}): pass the one to load")

    files = _weight_files(p, fmt)
    if not files:
        raise FileNotFoundError(f"no *{_SUFFIX[fmt]} checkpoint files in {p}")
    if fmt == "gguf" and len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ValueError(f"several GGUF files in {p} ({names}): pass the file to load")
    return files


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _unreadable(file: Path, reason: object) -> CheckpointError:
    """The error for a corrupt or truncated checkpoint file."""
    if isinstance(reason, BaseException):
        text = str(reason).strip()
        reason = f"{type(reason).__name__}: {text}" if text else type(reason).__name__
    size = f" (the file has {file.stat().st_size} bytes: truncated or corrupt)" \
        if file.is_file() else ""
    return CheckpointError(f"cannot read checkpoint file {file}: {reason}{size}", file=file)


def _iter_safetensors(file: Path) -> WeightIterator:
    """Tensors of one safetensors file, memory-mapped, in the order they lie in the file."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
        names = handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys()
    except Exception as exc:
        raise _unreadable(file, exc) from exc
    with handle:  # releases the memory map when done or when the consumer stops early
        for name in names:
            try:
                tensor = handle.get_tensor(name)
            except Exception as exc:
                raise _unreadable(file, f"tensor {name!r}: {exc}") from exc
            yield name, tensor


def _iter_bin(file: Path) -> WeightIterator:
    """Tensors of one PyTorch state-dict file (``torch.save`` of a dict of tensors)."""
    # mmap needs the zip format that torch.save writes since 1.6; older pickles load eagerly.
    use_mmap = zipfile.is_zipfile(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as exc:
        raise _unreadable(file, exc) from exc
    if not isinstance(state, dict):
        raise _unreadable(file, f"expected a dict of tensors, found {type(state).__name__}")
    for name in list(state):
        tensor = state.pop(name)  # drop our reference once it is handed out
        if not isinstance(tensor, torch.Tensor):
            raise _unreadable(file, f"entry {name!r} is a {type(tensor).__name__}, not a tensor")
        yield str(name), tensor


def _gguf_module() -> ModuleType:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - gguf is a dependency of the runtime
        raise ImportError("reading GGUF checkpoints needs the 'gguf' package") from exc
    return gguf


def gguf_torch_shape(gguf_shape: Any) -> tuple[int, ...]:
    """PyTorch shape of a GGUF tensor: GGUF lists dimensions fastest-varying first."""
    return tuple(int(d) for d in reversed(list(gguf_shape)))


# GGUF metadata value types (the spec's numbering): fixed-size scalars by struct format.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
                 12: "d"}
_GGUF_NUMPY = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8",
               11: "i8", 12: "f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor of a GGUF file lies: name, PyTorch shape, GGML type, byte range."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute, from the start of the file
    nbytes: int


class _Cursor:
    """Reads GGUF's little-endian values from a buffer, front to back."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("Q")
        end = self.pos + length
        if end > len(self.buffer):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self.buffer[self.pos:end]).decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, value_type: int) -> object:
        if value_type == _GGUF_STRING:
            return self.string()
        if value_type == _GGUF_ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            if item_type in _GGUF_NUMPY:  # one numpy read for the whole array
                dtype = np.dtype("<" + _GGUF_NUMPY[item_type])
                if self.pos + count * dtype.itemsize > len(self.buffer):
                    raise ValueError("an array runs past the end of the file")
                items = np.frombuffer(self.buffer, dtype, count, self.pos).tolist()
                self.pos += count * dtype.itemsize
                return items
            if item_type == _GGUF_ARRAY:  # arrays of arrays: flattened, like gguf's reader
                return [x for _ in range(count) for x in self.value(_GGUF_ARRAY)]  # type: ignore
            return [self.value(item_type) for _ in range(count)]
        if value_type not in _GGUF_SCALARS:
            raise ValueError(f"unknown metadata value type {value_type}")
        return self.scalar(_GGUF_SCALARS[value_type])


class GGUFFile:
    """One GGUF file's header, parsed once: ``metadata`` (key -> value, in file order) and
    ``tensors`` (names, shapes, byte ranges). Tensor data is read through ``open_tensors``."""

    def __init__(self, file: Path) -> None:
        self.file = file
        with open(file, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise ValueError("the file is empty")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    self._parse(_Cursor(view), len(mapped))
                finally:
                    view.release()

    def _parse(self, cursor: _Cursor, size: int) -> None:
        if bytes(cursor.buffer[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        cursor.pos = 4
        version = cursor.scalar("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are; a huge "
                             "number means a big-endian file)")
        tensor_count, kv_count = cursor.scalar("Q"), cursor.scalar("Q")
        self.metadata: dict[str, object] = {}
        for _ in range(kv_count):
            key = cursor.string()
            try:
                self.metadata[key] = cursor.value(cursor.scalar("I"))
            except (ValueError, struct.error) as exc:
                raise ValueError(f"metadata field {key!r}: {exc}") from exc
        infos = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = [cursor.scalar("Q") for _ in range(cursor.scalar("I"))]
            infos.append((name, gguf_torch_shape(dims), cursor.scalar("I"), cursor.scalar("Q")))
        alignment = int(self.metadata.get("general.alignment", _GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-cursor.pos // alignment) * alignment
        self.size = size
        self.tensors = [GGUFTensorInfo(name, shape, qtype, data_start + offset,
                                       _gguf_nbytes(shape, qtype))
                        for name, shape, qtype, offset in infos]
        for info in self.tensors:
            if info.offset + info.nbytes > size:
                raise ValueError(f"truncated: tensor {info.name!r} ({info.nbytes} bytes at "
                                 f"{info.offset}) runs past the end of the file")

    def open_tensors(self) -> Iterator[tuple[GGUFTensorInfo, torch.Tensor]]:
        """Every tensor in file order, in PyTorch dimension order: float32 for floating-point
        and quantized types, integer types as stored. The file is mapped copy-on-write for this
        iteration only: F32 tensors are views of the map (no copy; writing to one changes this
        iteration's private pages, never the file), other types are dequantized."""
        with open(self.file, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        for info in self.tensors:
            try:
                tensor = _gguf_tensor(mapped, info)
            except Exception as exc:
                raise ValueError(f"tensor {info.name!r}: {exc}") from exc
            yield info, tensor


def _gguf_tensor(mapped: mmap.mmap, info: GGUFTensorInfo) -> torch.Tensor:
    """One tensor of a mapped GGUF file (see ``GGUFFile.open_tensors``)."""
    gguf = _gguf_module()
    if info.offset + info.nbytes > len(mapped):
        raise ValueError(f"its data ({info.nbytes} bytes at {info.offset}) runs past the end of "
                         f"the file ({len(mapped)} bytes): the file is truncated")
    raw = np.frombuffer(mapped, np.uint8, info.nbytes, info.offset)
    rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
    raw = raw.reshape(rows, -1)
    types = gguf.GGMLQuantizationType
    qtype = types(info.ggml_type)
    integer = {types.I8: np.int8, types.I16: np.int16, types.I32: np.int32, types.I64: np.int64}
    if qtype.name in _TORCH_DEQUANT:
        # One thread: these element-wise passes over a few MB gain nothing from more, and on a
        # busy machine torch's thread pool made them several times slower than numpy.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            tensor = _TORCH_DEQUANT[qtype.name](torch.from_numpy(raw))
        finally:
            torch.set_num_threads(threads)
    else:
        if qtype in integer:
            array = raw.view(integer[qtype])
        elif qtype == types.F64:
            array = raw.view(np.float64).astype(np.float32)
        else:
            array = gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False)
        tensor = torch.from_numpy(array)
    if tensor.numel() != int(np.prod(info.shape, dtype=np.int64)):
        raise ValueError(f"{tensor.numel()} values for shape {info.shape}")
    return tensor.reshape(info.shape)


# The common llama.cpp block types, dequantized with torch (several times faster than the gguf
# package's numpy code, same float32 arithmetic): ``raw`` is uint8 [rows, row bytes].
def _blocks(raw: torch.Tensor, block_bytes: int) -> torch.Tensor:
    return raw.reshape(-1, block_bytes)


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(raw, 34)  # f16 scale, 32 x int8
    values = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (_half(blocks, 0) * values).reshape(raw.shape[0], -1)


def _nibbles(quants: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: the low nibbles are elements 0-15, the high ones 16-31."""
    return torch.cat([quants & 0x0F, quants >> 4], dim=1).float()


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(raw, 18)  # f16 scale, 16 bytes of nibbles (value - 8)
    return (_half(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8.0)).reshape(raw.shape[0], -1)


def _dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(raw, 20)  # f16 scale, f16 minimum, 16 bytes of nibbles
    values = _half(blocks, 0) * _nibbles(blocks[:, 4:]) + _half(blocks, 2)
    return values.reshape(raw.shape[0], -1)


def _view_f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float32)  # no copy: a view of the mapped file


def _f16_to_f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float16).float()


def _bf16_to_f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.bfloat16).float()


_TORCH_DEQUANT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _view_f32, "F16": _f16_to_f32, "BF16": _bf16_to_f32,
    "Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1,
}


def _gguf_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    """Bytes a tensor of ``shape`` takes in GGML type ``ggml_type`` (blocks of the last dim)."""
    gguf = _gguf_module()
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unknown GGML tensor type {ggml_type}") from exc
    elements = int(np.prod(shape, dtype=np.int64))
    return elements // block * type_size


_gguf_cache_lock = threading.Lock()
_gguf_cache: dict[tuple[str, int, int], GGUFFile] = {}


def gguf_file(path: PathLike) -> GGUFFile:
    """The parsed GGUF file at ``path`` (a .gguf file, or a folder holding exactly one).

    Parsed once: later calls for the same unchanged file (path, size and modification time)
    return the same ``GGUFFile``, so the config, the tokenizer and the weights share one parse.
    The header of the most recent file stays cached (no file stays open or mapped). Raises
    ValueError("cannot read checkpoint file ...") for a corrupt file.
    """
    file = checkpoint_files(_existing(path), "gguf")[0].resolve()
    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns)
    with _gguf_cache_lock:
        cached = _gguf_cache.get(key)
        if cached is not None:
            return cached
        try:
            parsed = GGUFFile(file)
        except (ValueError, OSError, struct.error) as exc:
            raise _unreadable(file, exc) from exc
        _gguf_cache.clear()
        _gguf_cache[key] = parsed
        return parsed


def _iter_gguf(file: Path) -> WeightIterator:
    """Tensors of one GGUF file, as float32 in PyTorch dimension order, in file order."""
    tensors = gguf_file(file).open_tensors()
    while True:
        try:
            info, tensor = next(tensors)
        except StopIteration:
            return
        except Exception as exc:
            raise _unreadable(file, exc if isinstance(exc, OSError) else str(exc)) from exc
        yield info.name, tensor


_READERS: dict[str, Callable[[Path], WeightIterator]] = {
    "safetensors": _iter_safetensors,
    "bin": _iter_bin,
    "gguf": _iter_gguf,
}


class CheckpointWeights(Iterator[tuple[str, torch.Tensor]]):
    """The ``(name, tensor)`` iterator of one checkpoint, which knows where each tensor lies.

    Attributes:
        path: the checkpoint path given to ``iterate_weights`` (file, index or directory).
        format: ``"safetensors"``, ``"bin"`` or ``"gguf"``.
        files: the files read, in order.
        current_file: the file the latest tensor came from (the file being read when a reader
            error is raised); None before the first tensor.
    """

    def __init__(self, path: Path, fmt: str, files: list[Path],
                 reader: Callable[[Path], WeightIterator]) -> None:
        self.path = path
        self.format = fmt
        self.files = list(files)
        self.current_file: Path | None = None
        self._tensors = self._iterate(reader)

    def _iterate(self, reader: Callable[[Path], WeightIterator]) -> WeightIterator:
        for file in self.files:
            self.current_file = file
            yield from reader(file)

    def __iter__(self) -> CheckpointWeights:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        return next(self._tensors)

    def close(self) -> None:
        """Stops early and releases the open file (memory map) at once."""
        self._tensors.close()


def iterate_weights(path: PathLike, fmt: str | None = None) -> CheckpointWeights:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint at ``path``, one at a time.

    Args:
        path: a checkpoint file, an ``*.index.json``, or a directory (see ``checkpoint_files``).
        fmt: ``"safetensors"``, ``"bin"`` or ``"gguf"``; detected from ``path`` when None.

    The path, format and shard list are checked when this is called (``FileNotFoundError`` /
    ``ValueError``); a corrupt file raises ``ValueError`` naming it when the iteration reaches
    it. The returned iterator's ``current_file`` names the file of the latest tensor. Tensors
    are on the CPU: safetensors and ``.bin`` tensors in their stored dtype (and may
    be backed by a memory map: copy them into parameters, don't modify them), GGUF tensors as
    float32 in PyTorch dimension order.
    """
    p = _existing(path)
    fmt = detect_format(p) if fmt is None else _check_format(fmt)
    files = checkpoint_files(p, fmt)
    return CheckpointWeights(p, fmt, files, _READERS[fmt])


# --------------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------------


def read_gguf_metadata(path: PathLike) -> dict[str, object]:
    """The key/value metadata of a GGUF file (or of the one GGUF file in a directory).

    Keys as in the file (``general.architecture``, ``llama.attention.head_count``,
    ``tokenizer.ggml.tokens``, ...), in file order; strings decoded as UTF-8, arrays as lists
    (arrays of arrays flattened), scalars as int / float / bool. The file is parsed once and
    shared with ``iterate_weights`` (see ``gguf_file``); the dict returned is a copy.
    """
    return dict(gguf_file(path).metadata)
