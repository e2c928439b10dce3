"""Megatron-style tensor-parallel linear layers.

ColumnParallelLinear splits the output features over ranks, RowParallelLinear the input
features (and sums the partial results). Each parameter carries a ``weight_loader`` that takes
the full checkpoint tensor and copies this rank's slice into it, so models load weights the same
way at any world size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import cacheflow_kernels
from cacheflow_runtime import parallel_state as ps
from cacheflow_runtime.kernels import skinny_fusion_enabled, skinny_gemm_applies
from cacheflow_runtime.layers.activation import SiluAndMul
from cacheflow_runtime.layers.layernorm import RMSNorm


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; one row on Hopper may go to cacheflow_kernels'
    ``skinny_gemm`` (see ``kernels.skinny_gemm_applies``), which reads the weight faster than
    cuBLAS at that size and starts before the kernel that writes ``x`` ends."""
    if skinny_gemm_applies(x, weight):
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        cacheflow_kernels.skinny_gemm(out, x, weight, bias)
        return out
    return F.linear(x, weight, bias)


def stream_fusion_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a pre-norm block should run on its residual stream, with the norms and residual
    adds inside its GEMMs (``forward_normed`` / ``forward_residual`` /
    ``forward_gated_residual``), for input ``x`` and a first projection ``weight``: asked for
    (CACHEFLOW_SKINNY_FUSE=1), one rank, and one row that skinny_gemm takes."""
    return (skinny_fusion_enabled() and x.dim() == 2 and x.shape[0] == 1
            and ps.get_tensor_parallel_world_size() == 1 and skinny_gemm_applies(x, weight))


def _takes_norm(x: torch.Tensor, weight: torch.Tensor, norm: nn.Module) -> bool:
    """Whether skinny_gemm computes ``F.linear(norm(x), weight)`` with the norm inside: a plain
    RMSNorm whose weight the kernel can read, on a row the kernel takes."""
    nw = getattr(norm, "weight", None)
    return (type(norm) is RMSNorm and nw is not None and skinny_gemm_applies(x, weight)
            and nw.dtype == x.dtype and nw.device == x.device and nw.is_contiguous()
            and nw.shape == (x.shape[1],) and nw.data_ptr() % 16 == 0)


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, which must divide exactly (``what`` names it in the error)."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor parallel "
                         f"size ({denominator})")
    return numerator // denominator


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str = "") -> None:
    """Copies ``loaded`` into ``param`` after checking that the shapes agree."""
    if param.shape != loaded.shape:
        raise ValueError(f"weight {name or 'tensor'}: checkpoint shape {tuple(loaded.shape)} "
                         f"does not match the parameter shape {tuple(param.shape)}")
    param.data.copy_(loaded.to(param.dtype))


def shard(loaded: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice of length ``size`` along ``dim``."""
    return loaded.narrow(dim, rank * size, size)


def _load_column_shard(param: nn.Parameter, loaded: torch.Tensor) -> None:
    size = param.shape[0]
    if loaded.shape[0] != size * ps.get_tensor_parallel_world_size():
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not split into "
                         f"{ps.get_tensor_parallel_world_size()} shards of {size} rows")
    copy_checked(param, shard(loaded, 0, size, ps.get_tensor_parallel_rank()))


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features) over the tensor-parallel ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False, params_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        tp = ps.get_tensor_parallel_world_size()
        self.output_size_per_partition = divide(output_size, tp, "output size")
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size,
                                               dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_partition, dtype=dtype),
                                     requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: Optional[object] = None) -> None:
        """Copies this rank's rows of the full checkpoint tensor ``loaded`` into ``param``."""
        _load_column_shard(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns this rank's output features (all of them with ``gather_output``)."""
        y = linear(x, self.weight, self.bias)
        return ps.all_gather(y, dim=-1) if self.gather_output else y

    def forward_normed(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """``forward(norm(x))``. For one row on Hopper with a plain RMSNorm, the norm runs inside
        skinny_gemm (each CTA normalizes the row itself; an element of the normalized row can
        differ from the norm kernel's by one rounding step): one kernel fewer."""
        if not self.gather_output and _takes_norm(x, self.weight, norm):
            out = torch.empty(x.shape[0], self.weight.shape[0], dtype=x.dtype, device=x.device)
            cacheflow_kernels.skinny_gemm(out, x, self.weight, self.bias,
                                          norm_weight=norm.weight, eps=norm.eps)
            return out
        return self.forward(norm(x))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matrix (e.g. gate and up).

    Each rank holds its slice of every part, concatenated; load each part with ``shard_id`` = its
    index in ``output_sizes``.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True,
                 params_dtype: Optional[torch.dtype] = None) -> None:
        self.output_sizes = list(output_sizes)
        tp = ps.get_tensor_parallel_world_size()
        for i, size in enumerate(self.output_sizes):  # each rank holds a slice of every part
            divide(size, tp, f"part {i} of the fused projection")
        super().__init__(input_size, sum(output_sizes), bias, False, params_dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: Optional[object] = None) -> None:
        """Copies this rank's slice of part ``shard_id`` (or of the fused tensor when None)."""
        tp, rank = ps.get_tensor_parallel_world_size(), ps.get_tensor_parallel_rank()
        if shard_id is None:
            if loaded.shape[0] != sum(self.output_sizes):
                raise ValueError(f"fused checkpoint shape {tuple(loaded.shape)} does not have "
                                 f"{sum(self.output_sizes)} rows ({self.output_sizes})")
            for i, part in enumerate(loaded.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        index = int(shard_id)
        size = divide(self.output_sizes[index], tp, f"part {index} of the fused projection")
        offset = sum(divide(s, tp, "fused part") for s in self.output_sizes[:index])
        if loaded.shape[0] != self.output_sizes[index]:
            raise ValueError(f"part {index}: checkpoint shape {tuple(loaded.shape)} does not "
                             f"have {self.output_sizes[index]} rows")
        copy_checked(param.data.narrow(0, offset, size), shard(loaded, 0, size, rank))


class QKVParallelLinear(ColumnParallelLinear):
    """The query, key and value projections fused; heads are split over ranks (GQA aware).

    With fewer KV heads than ranks, each KV head is replicated on the ranks that share it.
    Load with ``shard_id`` "q", "k" or "v" (the HF tensors), or None for an already fused tensor
    laid out as [q; k; v].
    """

    def __init__(self, hidden_size: int, head_size: int, num_heads: int,
                 num_kv_heads: Optional[int] = None, bias: bool = True,
                 params_dtype: Optional[torch.dtype] = None) -> None:
        tp = ps.get_tensor_parallel_world_size()
        self.head_size = head_size
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.num_heads = divide(num_heads, tp, "number of attention heads")
        if self.total_num_kv_heads >= tp:
            self.num_kv_heads = divide(self.total_num_kv_heads, tp, "number of KV heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp, self.total_num_kv_heads, "tensor parallel size over "
                                      "KV heads")
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp * head_size
        super().__init__(hidden_size, output_size, bias, False, params_dtype)

    @property
    def q_size(self) -> int:
        """Query features on this rank."""
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        """Key (= value) features on this rank."""
        return self.num_kv_heads * self.head_size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: Optional[object] = None) -> None:
        """Copies this rank's heads of the q, k or v tensor ``loaded`` into ``param``."""
        if shard_id is None:
            q_total = self.total_num_heads * self.head_size
            kv_total = self.total_num_kv_heads * self.head_size
            if loaded.shape[0] != q_total + 2 * kv_total:
                raise ValueError(f"fused qkv checkpoint shape {tuple(loaded.shape)} does not have "
                                 f"{q_total} + 2 * {kv_total} rows")
            q, k, v = loaded.split([q_total, kv_total, kv_total], dim=0)
            for sid, part in (("q", q), ("k", k), ("v", v)):
                self.weight_loader(param, part, sid)
            return
        rank = ps.get_tensor_parallel_rank()
        if shard_id == "q":
            offset, size, src_rank, total = 0, self.q_size, rank, self.total_num_heads
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, src_rank, total = self.kv_size, rank // self.kv_replicas, self.total_num_kv_heads
        else:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        if loaded.shape[0] != total * self.head_size:
            raise ValueError(f"{shard_id} projection: checkpoint shape {tuple(loaded.shape)} does "
                             f"not have {total} heads of size {self.head_size}")
        copy_checked(param.data.narrow(0, offset, size), shard(loaded, 0, size, src_rank))


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features); partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 input_is_parallel: bool = True, reduce_results: bool = True,
                 params_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        tp = ps.get_tensor_parallel_world_size()
        self.input_size_per_partition = divide(input_size, tp, "input size")
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition,
                                               dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: Optional[object] = None) -> None:
        """Copies this rank's columns (the whole bias) of ``loaded`` into ``param``."""
        if param.dim() == 1:
            copy_checked(param, loaded)
            return
        size = param.shape[1]
        if loaded.shape[1] != size * ps.get_tensor_parallel_world_size():
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)} does not split into "
                             f"{ps.get_tensor_parallel_world_size()} shards of {size} columns")
        copy_checked(param, shard(loaded, 1, size, ps.get_tensor_parallel_rank()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the full output features."""
        if not self.input_is_parallel:
            x = shard(x, -1, self.input_size_per_partition, ps.get_tensor_parallel_rank())
        return self._reduce(linear(x, self.weight))

    def forward_gated(self, gate_up: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
        """``forward(act_fn(gate_up))`` for an MLP's down projection, ``gate_up`` = this rank's
        ``[gate | up]``. With SiLU, for one row on Hopper (``skinny_gemm_applies``), the
        activation is applied inside the GEMM: one kernel fewer per layer."""
        if (isinstance(act_fn, SiluAndMul) and self.input_is_parallel
                and skinny_gemm_applies(gate_up, self.weight, silu_gated=True)):
            out = torch.empty(gate_up.shape[0], self.weight.shape[0], dtype=gate_up.dtype,
                              device=gate_up.device)
            cacheflow_kernels.skinny_gemm(out, gate_up, self.weight, activation="silu")
            return self._reduce(out)
        return self.forward(act_fn(gate_up))

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + forward(x)``, the product rounded to the dtype before the add (as the
        fused add-and-norm kernel adds). ``residual`` may be overwritten with the sum: for one
        row on Hopper in a single-rank group, skinny_gemm adds it in place in its epilogue."""
        if self._adds_in_gemm(x, residual, silu_gated=False):
            cacheflow_kernels.skinny_gemm(residual, x, self.weight, self.bias, residual=residual)
            return residual
        return residual + self.forward(x)

    def forward_gated_residual(self, gate_up: torch.Tensor, act_fn: nn.Module,
                               residual: torch.Tensor) -> torch.Tensor:
        """``residual + forward_gated(gate_up, act_fn)``, as :meth:`forward_residual` adds: an
        MLP's down projection with its activation and the residual add inside one kernel for
        one row on Hopper (SiLU, single rank)."""
        if isinstance(act_fn, SiluAndMul) and self._adds_in_gemm(gate_up, residual,
                                                                 silu_gated=True):
            cacheflow_kernels.skinny_gemm(residual, gate_up, self.weight, self.bias,
                                          activation="silu", residual=residual)
            return residual
        return residual + self.forward_gated(gate_up, act_fn)

    def _adds_in_gemm(self, x: torch.Tensor, residual: torch.Tensor, silu_gated: bool) -> bool:
        """Whether skinny_gemm computes ``residual + x W^T + b`` in place: one rank (no partial
        sums to all-reduce first), x this rank's slice, a row the kernel takes."""
        return (ps.get_tensor_parallel_world_size() == 1 and self.input_is_parallel
                and skinny_gemm_applies(x, self.weight, silu_gated=silu_gated)
                and residual.shape == (x.shape[0], self.weight.shape[0])
                and residual.dtype == x.dtype and residual.device == x.device
                and residual.is_contiguous())

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        """The partial products of the ranks summed, then the bias."""
        if self.reduce_results:
            y = ps.all_reduce(y)
        return y + self.bias if self.bias is not None else y


class ReplicatedLinear(nn.Module):
    """A plain linear layer held whole by every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 params_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: Optional[object] = None) -> None:
        """Copies the whole of ``loaded`` into ``param``."""
        copy_checked(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b."""
        return linear(x, self.weight, self.bias)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor,
                          shard_id: Optional[object] = None) -> None:
    """Loader for parameters without one of their own: a whole copy."""
    copy_checked(param, loaded)
