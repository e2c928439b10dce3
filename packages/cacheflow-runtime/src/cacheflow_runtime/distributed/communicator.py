"""The tensor-parallel collectives: all_reduce, all_gather, reduce_scatter, broadcast.

Two implementations of one interface: :class:`NcclCommunicator` for CUDA tensors (libnccl
through ctypes, launched on torch's current stream, so the calls can be captured in CUDA
graphs), and :class:`GlooCommunicator` for CPU tensors (torch.distributed over gloo, so every
test runs on a CPU machine). ``create_communicator`` picks by device. Both need a CPU process
group (gloo) first: it carries the NCCL unique id from rank 0 to the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
import torch.distributed as dist

from cacheflow_runtime.distributed.nccl_library import (
    NCCL_DTYPES,
    UNIQUE_ID_BYTES,
    NcclInfo,
    NcclLibrary,
    NcclUniqueId,
)


class Communicator(ABC):
    """Collectives over the ranks of one tensor-parallel group; every rank calls each one with
    tensors of the same shape and dtype, in the same order."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device

    @property
    @abstractmethod
    def backend(self) -> str:
        """A description of the transport (e.g. "nccl 2.27.3 (the nvidia-nccl-cu13 wheel)")."""

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the ranks, in place; returns it."""

    @abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order (a new tensor)."""

    @abstractmethod
    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sums ``tensor`` over the ranks and returns this rank's block along ``dim`` (the size
        of ``dim`` must divide by the world size)."""

    @abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrites ``tensor`` on every rank with rank ``src``'s, in place; returns it."""

    def close(self) -> None:  # noqa: B027 - nothing to release unless a subclass holds it
        """Releases what the communicator holds; idempotent."""

    def _check(self, tensor: torch.Tensor) -> None:
        if tensor.device != self.device:
            raise ValueError(f"{type(self).__name__} of rank {self.rank} works on "
                             f"{self.device}, got a tensor on {tensor.device}")

    def _check_split(self, tensor: torch.Tensor, dim: int) -> int:
        size = tensor.shape[dim]
        if size % self.world_size:
            raise ValueError(f"reduce_scatter: dimension {dim} of size {size} does not split "
                             f"into {self.world_size} equal blocks")
        return size // self.world_size


class GlooCommunicator(Communicator):
    """CPU tensors over a torch.distributed gloo group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__(dist.get_rank(group), dist.get_world_size(group), torch.device("cpu"))
        self.group = group

    @property
    def backend(self) -> str:
        """Always "gloo (torch.distributed)"."""
        return "gloo (torch.distributed)"

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the ranks, in place; returns it."""
        self._check(tensor)
        if tensor.is_contiguous():
            dist.all_reduce(tensor, group=self.group)
        else:
            buf = tensor.contiguous()
            dist.all_reduce(buf, group=self.group)
            tensor.copy_(buf)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order."""
        self._check(tensor)
        parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format)
                 for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's block along ``dim`` of the sum over the ranks."""
        self._check(tensor)
        block = self._check_split(tensor, dim)
        # gloo has no reduce-scatter: reduce everything, keep this rank's block.
        total = tensor.contiguous().clone()
        dist.all_reduce(total, group=self.group)
        return total.narrow(dim, self.rank * block, block).contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrites ``tensor`` with rank ``src``'s, in place; returns it."""
        self._check(tensor)
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.broadcast(buf, src=dist.get_global_rank(self.group, src), group=self.group)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor


class NcclCommunicator(Communicator):
    """CUDA tensors over libnccl (ctypes), on torch's current stream: capturable in CUDA graphs.

    Built collectively by every rank of ``cpu_group`` (a gloo group), which carries rank 0's
    unique id to the others; the current CUDA device must be ``device`` on each rank.
    """

    def __init__(self, cpu_group: dist.ProcessGroup, device: torch.device,
                 library: Optional[NcclLibrary] = None) -> None:
        super().__init__(dist.get_rank(cpu_group), dist.get_world_size(cpu_group), device)
        self.nccl = library or NcclLibrary()
        uid = self.nccl.get_unique_id() if self.rank == 0 else NcclUniqueId()
        raw = torch.frombuffer(bytearray(bytes(uid.internal)), dtype=torch.uint8)
        dist.broadcast(raw, src=dist.get_global_rank(cpu_group, 0), group=cpu_group)
        ctypes_bytes = bytes(raw.tolist())
        assert len(ctypes_bytes) == UNIQUE_ID_BYTES
        uid = NcclUniqueId.from_buffer_copy(ctypes_bytes)
        with torch.cuda.device(device):
            self.comm: Optional[int] = self.nccl.comm_init_rank(self.world_size, uid, self.rank)
            # A first all-reduce sets NCCL's connections up outside any graph capture.
            warm = torch.ones(1, device=device)
            self.all_reduce(warm)
            torch.cuda.synchronize(device)
        if warm.item() != self.world_size:
            raise RuntimeError(f"NCCL warm-up all-reduce gave {warm.item()}, "
                               f"expected {self.world_size}")

    @property
    def info(self) -> NcclInfo:
        """Which libnccl was loaded and its version."""
        return self.nccl.info

    @property
    def backend(self) -> str:
        """"nccl <version> (<where the library came from>: <path>)"."""
        info = self.nccl.info
        return f"nccl {info.version} ({info.source}: {info.path})"

    def _handle(self) -> int:
        if self.comm is None:
            raise RuntimeError("the NCCL communicator was closed")
        return self.comm

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _dtype(self, tensor: torch.Tensor) -> int:
        self._check(tensor)
        if tensor.dtype not in NCCL_DTYPES:
            raise ValueError(f"NCCL collectives do not support dtype {tensor.dtype}")
        return NCCL_DTYPES[tensor.dtype]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the ranks, in place; returns it."""
        dtype = self._dtype(tensor)
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        self.nccl.all_reduce(buf.data_ptr(), buf.data_ptr(), buf.numel(), dtype, self._handle(),
                             self._stream())
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order."""
        dtype = self._dtype(tensor)
        src = tensor.contiguous()
        out = torch.empty((self.world_size, *src.shape), dtype=src.dtype, device=src.device)
        self.nccl.all_gather(src.data_ptr(), out.data_ptr(), src.numel(), dtype, self._handle(),
                             self._stream())
        if dim % max(src.dim(), 1) == 0 and src.dim() > 0:
            return out.reshape(self.world_size * src.shape[0], *src.shape[1:])
        return torch.cat(out.unbind(0), dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's block along ``dim`` of the sum over the ranks."""
        dtype = self._dtype(tensor)
        block = self._check_split(tensor, dim)
        # Blocks must be contiguous runs of memory: put ``dim`` first.
        src = tensor.movedim(dim, 0).contiguous()
        out = torch.empty((block, *src.shape[1:]), dtype=src.dtype, device=src.device)
        self.nccl.reduce_scatter(src.data_ptr(), out.data_ptr(), out.numel(), dtype,
                                 self._handle(), self._stream())
        return out.movedim(0, dim).contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrites ``tensor`` with rank ``src``'s, in place; returns it."""
        dtype = self._dtype(tensor)
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        self.nccl.broadcast(buf.data_ptr(), buf.data_ptr(), buf.numel(), dtype, src,
                            self._handle(), self._stream())
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def close(self) -> None:
        """Destroys the NCCL communicator; idempotent."""
        if self.comm is not None:
            comm, self.comm = self.comm, None
            self.nccl.comm_destroy(comm)


def create_communicator(cpu_group: dist.ProcessGroup, device: torch.device) -> Communicator:
    """NCCL for a CUDA ``device``, gloo (over ``cpu_group`` itself) for the CPU."""
    if device.type == "cuda":
        return NcclCommunicator(cpu_group, device)
    if device.type == "cpu":
        return GlooCommunicator(cpu_group)
    raise ValueError(f"tensor parallelism runs on 'cpu' or 'cuda' devices, not {device}")
