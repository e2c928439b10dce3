"""Checkpoint readers: safetensors, PyTorch ``.bin`` and GGUF, one tensor at a time.

``iterate_weights(path)`` yields ``(name, tensor)`` pairs with the names exactly as stored in the
file; the iterator it returns (``CheckpointWeights``) also tells which file the latest tensor came
from (``current_file``), so that loaders can name it in their errors. Mapping the names to a
model's parameter names (e.g. GGUF ``blk.0.attn_q.weight`` to HF
``model.layers.0.self_attn.q_proj.weight``) is the model's job.

- safetensors: ``safetensors.safe_open`` memory-maps each file; tensors keep their stored dtype.
- ``.bin``: ``torch.load(..., weights_only=True, mmap=True)`` (zip format; legacy non-zip pickles
  are loaded without mmap); tensors keep their stored dtype.
- GGUF: read through ``gguf.GGUFReader``; every floating-point or quantized tensor is dequantized
  to float32 and returned in PyTorch dimension order. GGUF stores dimensions fastest-varying
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
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from cacheflow_runtime.errors import CheckpointError

__all__ = [
    "FORMATS",
    "CheckpointWeights",
    "checkpoint_files",
    "detect_format",
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


def _open_gguf(file: Path) -> Any:
    """A ``gguf.GGUFReader`` over ``file`` (memory-mapped, read-only)."""
    gguf = _gguf_module()
    try:
        return gguf.GGUFReader(file, "r")
    except Exception as exc:
        raise _unreadable(file, exc) from exc


def gguf_torch_shape(gguf_shape: Any) -> tuple[int, ...]:
    """PyTorch shape of a GGUF tensor: GGUF lists dimensions fastest-varying first."""
    return tuple(int(d) for d in reversed(list(gguf_shape)))


def _gguf_tensor_to_numpy(tensor: Any) -> np.ndarray:
    """One ``gguf.ReaderTensor`` as a writable numpy array in PyTorch dimension order.

    Floating-point and quantized types become float32; integer types keep their dtype.
    """
    gguf = _gguf_module()
    qtype = tensor.tensor_type
    shape = gguf_torch_shape(tensor.shape)
    raw = tensor.data
    types = gguf.GGMLQuantizationType
    if qtype in (types.I8, types.I16, types.I32, types.I64):
        array = raw
    elif qtype == types.F64:
        array = raw.astype(np.float32)
    else:
        array = gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False)
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{array.size} values for shape {shape}")
    if np.may_share_memory(array, raw) or not array.flags.writeable:
        array = array.copy()  # detach from the read-only memory map
    return array.reshape(shape)


def _iter_gguf(file: Path) -> WeightIterator:
    """Tensors of one GGUF file, dequantized to float32, in file order."""
    reader = _open_gguf(file)
    for tensor in reader.tensors:
        try:
            array = _gguf_tensor_to_numpy(tensor)
        except Exception as exc:
            raise _unreadable(file, f"tensor {tensor.name!r}: {exc}") from exc
        yield tensor.name, torch.from_numpy(array)


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


def _decode_gguf_value(part: np.ndarray, value_type: Any) -> object:
    """One GGUF scalar or string from its reader ``part`` (a small numpy array)."""
    gguf = _gguf_module()
    vt = gguf.GGUFValueType
    if value_type == vt.STRING:
        return part.tobytes().decode("utf-8")
    if value_type == vt.BOOL:
        return bool(part[0])
    if value_type in (vt.FLOAT32, vt.FLOAT64):
        return float(part[0])
    return int(part[0])


def _decode_gguf_field(field: Any) -> object:
    """A ``gguf.ReaderField`` as a Python value: str, int, float, bool, or a list of those.

    The reader flattens arrays of arrays; they come back as one flat list.
    """
    gguf = _gguf_module()
    if not field.types:
        return None
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        item_type = field.types[-1]
        return [_decode_gguf_value(field.parts[i], item_type) for i in field.data]
    return _decode_gguf_value(field.parts[field.data[0]], field.types[0])


def read_gguf_metadata(path: PathLike) -> dict[str, object]:
    """The key/value metadata of a GGUF file (or of the one GGUF file in a directory).

    Keys as in the file (``general.architecture``, ``llama.attention.head_count``,
    ``tokenizer.ggml.tokens``, ...), in file order; strings decoded as UTF-8, arrays as lists,
    scalars as int / float / bool. The reader's pseudo-fields for the file header
    (``GGUF.version``, ``GGUF.tensor_count``, ``GGUF.kv_count``) are left out.
    """
    p = _existing(path)
    file = checkpoint_files(p, "gguf")[0]
    reader = _open_gguf(file)
    metadata: dict[str, object] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            metadata[name] = _decode_gguf_field(field)
        except Exception as exc:
            raise _unreadable(file, f"metadata field {name!r}: {exc}") from exc
    return metadata
