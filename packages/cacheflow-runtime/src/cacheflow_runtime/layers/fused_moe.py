"""Mixture-of-experts layer: router top-k selection and the experts' gated MLPs.

The experts are sharded by tensor parallelism like the dense MLP: each rank holds a slice of
every expert's intermediate dimension (rows of the fused gate/up weight, columns of the down
weight) and the partial outputs are summed over the ranks like ``RowParallelLinear``.

The computation groups tokens by expert: every (token, chosen expert) pair becomes one row, the
rows are sorted by expert, and each expert multiplies its contiguous segment. On CUDA in
float16/bfloat16 the layer runs four kernels of cacheflow-kernels (the fused path):
``moe_sort_by_expert`` (the segments, on the device), ``moe_grouped_gemm_gated`` (the gate/up
projection reading each row's token through an index, with the gated activation in its
epilogue), ``moe_grouped_gemm`` with ``out_index``/``out_scale`` (the down projection, each row
times its routing weight, written to its (token, slot) row) and ``moe_sum_topk`` (each token's
slots summed in float32 in slot order, rounded once: deterministic). ``CACHEFLOW_MOE_FUSE`` (or
the ``fuse`` argument of :func:`fused_experts`) swaps any of those pieces for the previous step,
for A/B runs: see :func:`fuse_pieces`. Elsewhere (CPU, float32) a torch loop runs over the
segments.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from cacheflow_runtime import parallel_state as ps
from cacheflow_runtime.kernels import kernels_for
from cacheflow_runtime.layers.activation import GeluAndMul, SiluAndMul
from cacheflow_runtime.layers.linear import copy_checked, divide, shard

# Expert activations: HF ``hidden_act`` name -> the gated layer computing act(gate) * up.
_ACTIVATIONS = {
    "silu": lambda: SiluAndMul(),
    "swish": lambda: SiluAndMul(),
    "gelu": lambda: GeluAndMul("none"),
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
}
_PARTS = ("gate", "up", "down")

#: Pieces of the fused CUDA path (see :func:`fuse_pieces`).
FUSE_PIECES = ("sort", "gather", "act", "combine")
FUSE_ENV = "CACHEFLOW_MOE_FUSE"


@functools.lru_cache(maxsize=64)
def _parse_fuse(value: str) -> frozenset[str]:
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if not entries or entries == ["none"] or entries == ["0"]:
        return frozenset()
    if entries in (["all"], ["1"]):
        return frozenset(FUSE_PIECES)
    removed = [e[1:] for e in entries if e.startswith("-")]
    if removed and len(removed) != len(entries):
        raise ValueError(f"{FUSE_ENV}={value!r}: either pieces to use or '-piece' entries to "
                         "leave out, not both")
    names = removed or entries
    unknown = sorted(set(names) - set(FUSE_PIECES))
    if unknown:
        raise ValueError(f"{FUSE_ENV}={value!r}: unknown piece(s) {unknown}; known: "
                         f"{', '.join(FUSE_PIECES)}, or 'all' / 'none'")
    return frozenset(FUSE_PIECES) - frozenset(removed) if removed else frozenset(names)


def fuse_pieces(value: Optional[str] = None) -> frozenset[str]:
    """The pieces of the fused CUDA path that :func:`fused_experts` uses.

    ``value`` (default: the environment variable ``CACHEFLOW_MOE_FUSE``, read at every call so
    that one process can A/B the paths): unset, ``"all"`` or ``"1"``: every piece; ``"none"``,
    ``"0"`` or ``""``: none (the previous path: torch argsort + scatter_add + cumsum, an
    ``index_select`` copy of the tokens, the activation kernel on a ``[rows, 2 I]``
    intermediate, a float32 ``index_add_`` combine); a comma-separated list of pieces to use
    (``"sort,act"``) or to leave out (``"-gather,-combine"``). The pieces:

    - ``sort``: ``moe_sort_by_expert`` (else torch's stable argsort and a cumsum of counts);
    - ``gather``: the gate/up GEMM reads the tokens through ``row_index`` (else a gathered copy);
    - ``act``: the gated activation in the gate/up GEMM's epilogue (SiLU, GELU or GELU-tanh
      layers; else the activation layer on the GEMM's output);
    - ``combine``: the down GEMM scales by the routing weight and scatters each row to its
      (token, slot) row, ``moe_sum_topk`` adds the slots (else float32 scale + ``index_add_``).

    Raises ValueError for an unknown piece.
    """
    if value is None:
        value = os.environ.get(FUSE_ENV, "all")
    return _parse_fuse(value)


def select_experts(router_logits: torch.Tensor, top_k: int,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` experts of every token and their weights, from the router's logits.

    Softmax over all experts in float32, then the ``top_k`` largest probabilities; with
    ``renormalize`` they are divided by their sum (which equals a softmax over the top-k
    logits: Mixtral, and Qwen-MoE's ``norm_topk_prob``).

    Returns (weights float32 [num_tokens, top_k], expert ids int64 [num_tokens, top_k]).
    """
    if not 1 <= top_k <= router_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, {router_logits.shape[-1]}] (the number of "
                         f"experts), got {top_k}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sort_by_expert(topk_ids: torch.Tensor,
                   num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): ``order`` lists the flattened (token, slot) pairs sorted by expert
    (stable: tokens keep their order within an expert); ``offsets`` [num_experts + 1] int64 are
    the segment bounds of every expert in that order. No host synchronisation."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e].T`` for the expert segments given by ``offsets``.

    x: [num_rows, in] sorted by expert; w: [num_experts, out, in]. One kernel launch on CUDA
    in float16/bfloat16 (in features a multiple of 8); on the CPU a loop over the segments;
    on CUDA otherwise a masked loop over the experts without host synchronisation.
    """
    out = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    ck = kernels_for(x, w)
    if (ck is not None and x.dtype in (torch.float16, torch.bfloat16) and x.shape[1] % 8 == 0
            and hasattr(ck, "moe_grouped_gemm")):
        ck.moe_grouped_gemm(out, x.contiguous(), w, offsets)
        return out
    if x.is_cuda:
        # No host sync (CUDA-graph capturable): every expert over every row, rows masked in;
        # E times the work, for the dtypes and sizes the kernel does not take (float32).
        expert_of_row = torch.searchsorted(
            offsets[1:], torch.arange(x.shape[0], device=x.device), right=True)
        out.zero_()
        for e in range(w.shape[0]):
            mine = (expert_of_row == e).unsqueeze(1)
            out = torch.where(mine, F.linear(x, w[e]), out)
        return out
    bounds = offsets.tolist()
    for e in range(w.shape[0]):
        begin, end = bounds[e], bounds[e + 1]
        if end > begin:
            torch.matmul(x[begin:end], w[e].t(), out=out[begin:end])
    return out


class FusedMoE(nn.Module):
    """The experts of a MoE block: ``sum_k weight_k * down_e(act(gate_e(x)) * up_e(x))``.

    Parameters: ``w13_weight`` [num_experts, 2 * intermediate / tp, hidden] (this rank's gate
    rows, then its up rows, per expert) and ``w2_weight`` [num_experts, hidden,
    intermediate / tp]. ``forward(hidden_states, router_logits)`` selects ``top_k`` experts per
    token (``renormalize``: see :func:`select_experts`); with ``reduce_results`` the output is
    summed over the tensor-parallel ranks (else each rank returns its partial sum).

    Load with ``weight_loader(param, tensor, shard_id)``:

    - ``shard_id=(expert, part)``, part "gate", "up" or "down": one expert's HF tensor
      (gate/up ``[intermediate, hidden]``, down ``[hidden, intermediate]``);
    - ``shard_id=(None, part)``: the part for all experts at once (``[E, intermediate, hidden]``
      or ``[E, hidden, intermediate]``, as GGUF files store them);
    - ``shard_id=None``: the whole fused tensor (``[E, 2 * intermediate, hidden]`` gate then up,
      or ``[E, hidden, intermediate]``), as transformers 5 names ``experts.gate_up_proj`` /
      ``experts.down_proj``.

    :meth:`checkpoint_names` gives the ``stacked`` entries of a StrictLoader for such names.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 reduce_results: bool = True, renormalize: bool = True,
                 activation: str = "silu", params_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"a MoE layer needs 1 <= top_k <= num_experts, got top_k={top_k}, "
                             f"num_experts={num_experts}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"expert activation {activation!r} is not supported; supported: "
                             f"{', '.join(sorted(_ACTIVATIONS))}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.reduce_results = reduce_results
        self.renormalize = renormalize
        tp = ps.get_tensor_parallel_world_size()
        self.intermediate_size_per_partition = divide(intermediate_size, tp,
                                                      "expert intermediate size")
        local = self.intermediate_size_per_partition
        dtype = params_dtype or torch.get_default_dtype()
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size,
                                                   dtype=dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, local, dtype=dtype),
                                      requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self.act_fn = _ACTIVATIONS[activation]()

    @staticmethod
    def checkpoint_names(prefix: str, num_experts: int, gate: str = "gate_proj",
                         up: str = "up_proj", down: str = "down_proj",
                         ) -> dict[str, tuple[str, object]]:
        """StrictLoader ``stacked`` entries mapping per-expert checkpoint names to the fused
        parameters of a FusedMoE registered as ``<module>.<prefix>``.

        E.g. ``prefix="experts"`` with Mixtral's ``w1`` / ``w3`` / ``w2``:
        ``".experts.3.w1.weight" -> (".experts.w13_weight", (3, "gate"))``; the fused
        transformers 5 names ``.experts.gate_up_proj`` / ``.experts.down_proj`` load whole.
        """
        entries: dict[str, tuple[str, object]] = {}
        for e in range(num_experts):
            for name, part in ((gate, "gate"), (up, "up"), (down, "down")):
                fused = "w2_weight" if part == "down" else "w13_weight"
                entries[f".{prefix}.{e}.{name}.weight"] = (f".{prefix}.{fused}", (e, part))
        entries[f".{prefix}.gate_up_proj"] = (f".{prefix}.w13_weight", None)
        entries[f".{prefix}.down_proj"] = (f".{prefix}.w2_weight", None)
        return entries

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: Optional[tuple[Optional[int], str]] = None) -> None:
        """Copies this rank's slice of ``loaded`` (see the class docstring for ``shard_id``)."""
        is_w2 = param is self.w2_weight
        if shard_id is None:
            if is_w2:
                self._load_part(param, loaded, None, "down")
                return
            full = self.intermediate_size
            if loaded.dim() != 3 or loaded.shape[1] != 2 * full:
                raise ValueError(f"fused expert gate/up tensor of shape {tuple(loaded.shape)} is "
                                 f"not [num_experts, 2 * {full}, hidden]")
            self._load_part(param, loaded[:, :full], None, "gate")
            self._load_part(param, loaded[:, full:], None, "up")
            return
        expert, part = shard_id
        if part not in _PARTS or (part == "down") != is_w2:
            raise ValueError(f"expert shard id {shard_id!r} does not fit this parameter")
        self._load_part(param, loaded, expert, part)

    def _load_part(self, param: nn.Parameter, loaded: torch.Tensor, expert: Optional[int],
                   part: str) -> None:
        """Copies part ``part`` of expert ``expert`` (None: every expert, a leading dim)."""
        if expert is not None and not 0 <= int(expert) < self.num_experts:
            raise ValueError(f"expert {expert} is out of range for {self.num_experts} experts")
        rank, local = ps.get_tensor_parallel_rank(), self.intermediate_size_per_partition
        target = param.data if expert is None else param.data[int(expert)]
        lead = (self.num_experts,) if expert is None else ()
        if part == "down":
            want = lead + (self.hidden_size, self.intermediate_size)
            piece = shard(loaded, -1, local, rank) if loaded.shape == want else None
        else:
            want = lead + (self.intermediate_size, self.hidden_size)
            piece = shard(loaded, -2, local, rank) if loaded.shape == want else None
            target = target.narrow(-2, 0 if part == "gate" else local, local)
        if piece is None:
            what = "all experts" if expert is None else f"expert {expert}"
            raise ValueError(f"{part} projection of {what}: checkpoint shape "
                             f"{tuple(loaded.shape)} is not {want}")
        copy_checked(target, piece, f"{part} projection")

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """hidden_states [num_tokens, hidden], router_logits [num_tokens, num_experts] ->
        [num_tokens, hidden]."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        out = fused_experts(hidden_states, self.w13_weight, self.w2_weight, weights, ids,
                            self.act_fn)
        return ps.all_reduce(out) if self.reduce_results else out


def fused_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, act_fn: nn.Module,
                  fuse: Optional[Union[str, frozenset[str]]] = None) -> torch.Tensor:
    """The weighted sum of every token's chosen experts (this rank's partial sum under TP).

    hidden_states [T, H]; w13 [E, 2 * I, H] (gate rows, then up rows); w2 [E, H, I];
    topk_weights / topk_ids [T, k]; ``act_fn`` maps [rows, 2 * I] to [rows, I].
    Each token's contributions are summed in float32 and rounded once.

    On CUDA in float16/bfloat16 (H and I multiples of 8) the fused kernels run; ``fuse`` (a
    :func:`fuse_pieces` string or set of pieces; default ``CACHEFLOW_MOE_FUSE``) picks which
    pieces of that path replace the previous steps. Neither synchronises with the host, so both
    are CUDA-graph capturable.
    """
    ck = kernels_for(hidden_states, w13, w2)
    if ck is not None and _fusable(ck, hidden_states, w2):
        pieces = fuse if isinstance(fuse, frozenset) else fuse_pieces(fuse)
        if pieces:
            return _fused_cuda(ck, pieces, hidden_states, w13, w2, topk_weights, topk_ids,
                               act_fn)
    num_tokens, top_k = topk_ids.shape
    order, offsets = sort_by_expert(topk_ids, w13.shape[0])
    token_of_row = order // top_k
    rows = hidden_states.index_select(0, token_of_row)
    inter = act_fn(grouped_linear(rows, w13, offsets))
    expert_out = grouped_linear(inter, w2, offsets)
    scaled = expert_out.float() * topk_weights.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, token_of_row, scaled)
    return out.to(hidden_states.dtype)


def _fusable(ck: object, hidden_states: torch.Tensor, w2: torch.Tensor) -> bool:
    """The fused kernels take these shapes and dtypes, and the installed kernels have them."""
    return (hidden_states.dtype in (torch.float16, torch.bfloat16) and hidden_states.dim() == 2
            and hidden_states.shape[1] % 8 == 0 and w2.shape[2] % 8 == 0
            and hasattr(ck, "moe_sort_by_expert") and hasattr(ck, "moe_sum_topk"))


def _gated_activation(act_fn: nn.Module) -> Optional[str]:
    """The ``moe_grouped_gemm_gated`` activation computing ``act_fn``, None for another."""
    if type(act_fn) is SiluAndMul:
        return "silu"
    if type(act_fn) is GeluAndMul:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act_fn.approximate)
    return None


def _fused_cuda(ck: object, pieces: frozenset[str], hidden_states: torch.Tensor,
                w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """fused_experts on the kernels; each piece not in ``pieces`` runs the previous step."""
    x = hidden_states.contiguous()
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, inter = w2.shape[0], w2.shape[1], w2.shape[2]
    rows, dev, dtype = num_tokens * top_k, x.device, x.dtype
    ids = topk_ids.contiguous()
    if "sort" in pieces:
        offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=dev)
        pairs = torch.empty(rows, dtype=torch.int32, device=dev)
        token_of_row = torch.empty(rows, dtype=torch.int32, device=dev)
        ck.moe_sort_by_expert(offsets, pairs, token_of_row, ids)
    else:
        order, offsets = sort_by_expert(ids, num_experts)
        pairs = order.to(torch.int32)
        token_of_row = (order // top_k).to(torch.int32)

    gather = "gather" in pieces
    a = x if gather else x.index_select(0, token_of_row)
    row_index = token_of_row if gather else None
    activation = _gated_activation(act_fn) if "act" in pieces else None
    if activation is not None:
        h = torch.empty(rows, inter, dtype=dtype, device=dev)
        ck.moe_grouped_gemm_gated(h, a, w13, offsets, row_index=row_index, activation=activation)
    else:
        h13 = torch.empty(rows, 2 * inter, dtype=dtype, device=dev)
        ck.moe_grouped_gemm(h13, a, w13, offsets, row_index=row_index)
        h = act_fn(h13)

    if "combine" in pieces:
        weights = topk_weights.to(torch.float32).reshape(-1).contiguous()
        if top_k == 1:  # the token's row is its pair's row: no sum
            out = torch.zeros(num_tokens, hidden, dtype=dtype, device=dev)
            ck.moe_grouped_gemm(out, h, w2, offsets, out_index=pairs, out_scale=weights)
            return out
        per_slot = torch.empty(num_tokens, top_k, hidden, dtype=dtype, device=dev)
        ck.moe_grouped_gemm(per_slot.view(rows, hidden), h, w2, offsets, out_index=pairs,
                            out_scale=weights)
        out = torch.empty(num_tokens, hidden, dtype=dtype, device=dev)
        ck.moe_sum_topk(out, per_slot, ids, num_experts)
        return out
    y = torch.empty(rows, hidden, dtype=dtype, device=dev)
    ck.moe_grouped_gemm(y, h, w2, offsets)
    order = pairs.long()
    scaled = y.float() * topk_weights.reshape(-1)[order].unsqueeze(1)
    out32 = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=dev)
    out32.index_add_(0, order // top_k, scaled)
    return out32.to(dtype)


def per_expert_reference(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The plain per-expert loop with SiLU gating (a test and benchmark baseline)."""
    out = torch.zeros(hidden_states.shape[0], w2.shape[1], dtype=torch.float32,
                      device=hidden_states.device)
    for e in range(w13.shape[0]):
        token, slot = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        gate, up = F.linear(hidden_states[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None])
    return out.to(hidden_states.dtype)
