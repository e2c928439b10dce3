"""libnccl through ctypes: finding the library, its version, and the calls the communicator uses.

Where the library comes from, first found wins:

1. ``CACHEFLOW_NCCL_SO_PATH``: an explicit path to ``libnccl.so*`` (a user's choice overrides
   any discovery);
2. the ``nvidia-nccl-cu13`` or ``nvidia-nccl-cu12`` wheel (the runtime's ``cu13`` / ``cu12``
   extras install it);
3. torch's own copy (the ``libnccl`` next to torch's libraries, or the one torch already loaded
   into this process).

Nothing here needs a GPU to import; loading the library does not initialize CUDA.
"""

from __future__ import annotations

import ctypes
import glob
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch

ENV_NCCL_PATH = "CACHEFLOW_NCCL_SO_PATH"
NCCL_WHEELS = ("nvidia-nccl-cu13", "nvidia-nccl-cu12")
UNIQUE_ID_BYTES = 128

# ncclDataType_t (nccl.h)
NCCL_DTYPES: dict[torch.dtype, int] = {
    torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4,
    torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9,
}
# ncclRedOp_t (nccl.h)
NCCL_SUM = 0

ncclComm_t = ctypes.c_void_p
cudaStream_t = ctypes.c_void_p


class NcclUniqueId(ctypes.Structure):
    """``ncclUniqueId``: 128 opaque bytes made by rank 0 and handed to every rank."""

    _fields_ = [("internal", ctypes.c_byte * UNIQUE_ID_BYTES)]


class NcclError(RuntimeError):
    """A NCCL call returned an error code."""


def _wheel_candidates() -> list[tuple[str, str]]:
    found = []
    for dist in NCCL_WHEELS:
        try:
            files = metadata.files(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for f in files:
            if Path(str(f)).name.startswith("libnccl.so"):
                found.append((str(f.locate()), f"the {dist} wheel"))
    return found


def _torch_candidates() -> list[tuple[str, str]]:
    lib_dir = Path(torch.__file__).parent / "lib"
    found = [(p, "torch's bundled copy") for p in sorted(glob.glob(str(lib_dir / "libnccl*.so*")))]
    # A CUDA build of torch has usually loaded libnccl.so.2 already (from wherever its wheel
    # put it): the soname finds that copy.
    found.append(("libnccl.so.2", "the copy torch loaded"))
    return found


def candidate_paths() -> list[tuple[str, str]]:
    """(path, where it comes from) of every libnccl to try, in order."""
    env = os.environ.get(ENV_NCCL_PATH)
    if env:
        return [(env, f"${ENV_NCCL_PATH}")]
    return _wheel_candidates() + _torch_candidates()


def _decode_version(code: int) -> str:
    # NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch; older ones major * 1000 + ...
    if code >= 10000:
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    return f"{code // 1000}.{code // 100 % 10}.{code % 100}"


@dataclass(frozen=True)
class NcclInfo:
    """Which libnccl was loaded: its path, where it came from and its version."""

    path: str
    source: str
    version: str


class NcclLibrary:
    """The NCCL functions the communicator calls, bound with their C signatures."""

    def __init__(self, path: Optional[str] = None) -> None:
        candidates = [(path, "the given path")] if path else candidate_paths()
        errors = []
        for candidate, source in candidates:
            try:
                self.lib = ctypes.CDLL(candidate)
            except OSError as exc:
                errors.append(f"{candidate} ({source}): {exc}")
                continue
            self._bind()
            version = ctypes.c_int()
            self._check(self.lib.ncclGetVersion(ctypes.byref(version)))
            loaded = getattr(self.lib, "_name", candidate)
            self.info = NcclInfo(str(loaded), source, _decode_version(version.value))
            return
        tried = "; ".join(errors) or "nothing to try"
        raise RuntimeError(
            "cannot load libnccl for GPU tensor parallelism: install the runtime's extra "
            "(pip install 'cacheflow-runtime[cu12]' or '[cu13]') or set "
            f"{ENV_NCCL_PATH}=/path/to/libnccl.so.2. Tried: {tried}")

    def _bind(self) -> None:
        lib = self.lib
        c_int, c_size_t, c_void_p = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [c_int]
        signatures = {
            "ncclGetVersion": [ctypes.POINTER(c_int)],
            "ncclGetUniqueId": [ctypes.POINTER(NcclUniqueId)],
            "ncclCommInitRank": [ctypes.POINTER(ncclComm_t), c_int, NcclUniqueId, c_int],
            "ncclCommDestroy": [ncclComm_t],
            # sendbuff, recvbuff, count, datatype, op, comm, stream
            "ncclAllReduce": [c_void_p, c_void_p, c_size_t, c_int, c_int, ncclComm_t,
                              cudaStream_t],
            # sendbuff, recvbuff, sendcount, datatype, comm, stream
            "ncclAllGather": [c_void_p, c_void_p, c_size_t, c_int, ncclComm_t, cudaStream_t],
            # sendbuff, recvbuff, recvcount, datatype, op, comm, stream
            "ncclReduceScatter": [c_void_p, c_void_p, c_size_t, c_int, c_int, ncclComm_t,
                                  cudaStream_t],
            # sendbuff, recvbuff, count, datatype, root, comm, stream
            "ncclBroadcast": [c_void_p, c_void_p, c_size_t, c_int, c_int, ncclComm_t,
                              cudaStream_t],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.restype = c_int
            fn.argtypes = argtypes

    def _check(self, result: int) -> None:
        if result != 0:
            message = self.lib.ncclGetErrorString(result).decode(errors="replace")
            raise NcclError(f"NCCL error {result}: {message}")

    def get_unique_id(self) -> NcclUniqueId:
        """A fresh ``ncclUniqueId`` (rank 0 makes it, every rank joins with it)."""
        uid = NcclUniqueId()
        self._check(self.lib.ncclGetUniqueId(ctypes.byref(uid)))
        return uid

    def comm_init_rank(self, world_size: int, unique_id: NcclUniqueId, rank: int) -> int:
        """Joins the communicator of ``unique_id`` as ``rank`` on the current CUDA device."""
        comm = ncclComm_t()
        self._check(self.lib.ncclCommInitRank(ctypes.byref(comm), world_size, unique_id, rank))
        return int(comm.value or 0)

    def comm_destroy(self, comm: int) -> None:
        """Frees a communicator."""
        self._check(self.lib.ncclCommDestroy(comm))

    def all_reduce(self, send: int, recv: int, count: int, dtype: int, comm: int,
                   stream: int) -> None:
        """Sums ``count`` elements over the ranks (in place when send == recv)."""
        self._check(self.lib.ncclAllReduce(send, recv, count, dtype, NCCL_SUM, comm, stream))

    def all_gather(self, send: int, recv: int, send_count: int, dtype: int, comm: int,
                   stream: int) -> None:
        """Concatenates every rank's ``send_count`` elements into ``recv`` in rank order."""
        self._check(self.lib.ncclAllGather(send, recv, send_count, dtype, comm, stream))

    def reduce_scatter(self, send: int, recv: int, recv_count: int, dtype: int, comm: int,
                       stream: int) -> None:
        """Sums over the ranks and leaves block ``rank`` (``recv_count`` elements) in ``recv``."""
        self._check(self.lib.ncclReduceScatter(send, recv, recv_count, dtype, NCCL_SUM, comm,
                                               stream))

    def broadcast(self, send: int, recv: int, count: int, dtype: int, root: int, comm: int,
                  stream: int) -> None:
        """Copies ``root``'s ``count`` elements to every rank."""
        self._check(self.lib.ncclBroadcast(send, recv, count, dtype, root, comm, stream))
