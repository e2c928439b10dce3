"""Rotary position embeddings (neox and gpt-j styles, partial rotary, rope_scaling).

``rope_scaling`` types: ``linear`` (position interpolation), ``dynamic`` (dynamic NTK),
``llama3``, ``yarn`` and ``longrope`` (Phi-3's long-context variants; ``su`` is its older name),
with HF transformers' math and config keys.

Partial rotary (GPT-NeoX ``rotary_pct``, Phi-3 ``partial_rotary_factor``): only the first
``rotary_dim`` features of each head are rotated, the rest pass through unchanged.

Dynamic NTK and LongRoPE rotate by the sequence's length as well as the position. HF
transformers picks the frequencies in every forward pass from ``seq_len = max(position_ids) + 1``
and keys already in the cache keep the rotation they got when they were written. Run alone
through ``generate``, a sequence therefore has its whole prompt rotated for the prompt's length
``L`` (one forward pass), and each generated token at position ``p`` for ``p + 1``. We rotate
every token of a sequence at position ``p`` for the length ``max(L, p + 1)``
(``prompt_lens``): the same rotation whatever the batch holds, however the prompt is cut into
chunked-prefill steps, and after a preemption's recomputation. Without ``prompt_lens`` a
sequence is taken as a prompt that ends at its context length. Prefix caching must not share a
block rotated for one prompt length with a prompt of another: :func:`prompt_rotation_key` is
the part of a request's cache namespace that keeps them apart.

Dynamic NTK: lengths past ``max_position_embeddings`` get the base
``base * (factor * n / original - (factor - 1)) ** (d / (d - 2))``; shorter ones the plain
frequencies.

YaRN (Qwen2.5 / Qwen3 long-context configs): each frequency is blended between the original
(extrapolation) and the one divided by ``factor`` (interpolation) by a linear ramp over the
dimensions between the corrections for ``beta_fast`` and ``beta_slow`` rotations within
``original_max_position_embeddings`` (default: ``max_position_embeddings``); cos and sin are
multiplied by the attention factor (the config's, else ``0.1 * ln(factor) + 1``, or the ratio of
the ``mscale`` / ``mscale_all_dim`` forms of it when both are given). It depends on the position
alone, and serves positions up to ``factor`` times the original length (as vLLM does).

LongRoPE: the ``short_factor`` frequencies while the length is at most
``original_max_position_embeddings``, the ``long_factor`` ones after that; cos and sin are
multiplied by the attention factor ``sqrt(1 + log(factor) / log(original))`` (or the config's
``attention_factor``), where ``factor`` defaults to ``max_position_embeddings /
original_max_position_embeddings``. Both tables are precomputed, so the kernel and CUDA graphs
serve it too: a decode token (length ``p + 1``) picks its table from its position alone, on the
device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

import cacheflow_kernels
from cacheflow_runtime.kernels import kernels_for, rotary_cache_applies

ROPE_SCALING_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "su")


def rope_max_positions(max_position: int, rope_scaling: Optional[dict[str, Any]] = None) -> int:
    """The longest sequence a model supports given its ``max_position_embeddings``.

    ``linear`` and ``dynamic`` scaling stretch the trained length by ``factor``, ``yarn`` its
    ``original_max_position_embeddings`` (default: ``max_position``) by ``factor``; ``llama3``
    and ``longrope`` configs already state the stretched length in ``max_position_embeddings``.
    """
    kind = _scaling_type(rope_scaling)
    if kind in ("linear", "dynamic"):
        return int(max_position * float(rope_scaling["factor"]))
    if kind == "yarn":
        original, factor = _yarn_lengths(max_position, rope_scaling)
        return max(max_position, int(original * factor))
    return max_position


def rope_inv_freq(rotary_dim: int, base: float,
                  rope_scaling: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """The inverse frequencies [rotary_dim / 2] in float32, as HF transformers computes them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float()
                               / rotary_dim))
    kind = _scaling_type(rope_scaling)
    if kind == "linear":
        inv_freq = inv_freq / float(rope_scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
    return inv_freq


@functools.lru_cache(maxsize=256)
def dynamic_ntk_inv_freq(rotary_dim: int, base: float, factor: float, original_max_position: int,
                         seq_len: int, device: str = "cpu") -> torch.Tensor:
    """Dynamic NTK inverse frequencies [rotary_dim / 2] for a sequence of ``seq_len`` tokens.

    The base grows as ``base * (factor * L / original - (factor - 1)) ** (d / (d - 2))`` with
    ``L = max(seq_len, original)``, computed with the same tensor operations (float32, on
    ``device``) as HF transformers so that the results agree bit for bit. The returned tensor is
    shared (cached): do not modify it.
    """
    length = torch.tensor(max(seq_len, original_max_position), dtype=torch.int64, device=device)
    scaled = base * ((factor * length / original_max_position) - (factor - 1)) \
        ** (rotary_dim / (rotary_dim - 2))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float()
    return 1.0 / (scaled ** (exponents / rotary_dim))


def length_dependent_rope(max_position: int, rope_scaling: Optional[dict[str, Any]]
                          ) -> Optional[tuple[str, int]]:
    """("dynamic" or "longrope", the length past which it changes the rotation) for rotary
    scaling whose rotation depends on the sequence's length; None where it depends on the
    position alone. ``max_position`` is the config's ``max_position_embeddings``."""
    kind = _scaling_type(rope_scaling)
    if kind == "dynamic":
        return kind, max_position
    if kind == "longrope":
        original = rope_scaling.get("original_max_position_embeddings")
        if original is None:
            raise ValueError("longrope rope_scaling needs original_max_position_embeddings")
        return kind, int(original)
    return None


def prompt_rotation_key(rule: Optional[tuple[str, int]], prompt_len: int) -> str:
    """What a prompt's cached keys depend on besides its tokens, under ``rule`` (from
    :func:`length_dependent_rope`): "" where the rotation is the positions' alone (no rule, or
    a prompt within the rule's length), else a key naming the rotation used for this prompt
    (LongRoPE: the long factors; dynamic NTK: the prompt's own length)."""
    if rule is None or prompt_len <= rule[1]:
        return ""
    kind, _ = rule
    return "rope:long" if kind == "longrope" else f"rope:dynamic:{prompt_len}"


def _scaling_type(rope_scaling: Optional[dict[str, Any]]) -> str:
    if not rope_scaling:
        return "default"
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: "
                         f"{ROPE_SCALING_TYPES}")
    return "longrope" if kind == "su" else kind


def longrope_settings(rotary_dim: int, max_position: int,
                      cfg: dict[str, Any]) -> tuple[int, torch.Tensor, torch.Tensor, float]:
    """(original length, short inverse frequencies, long inverse frequencies, attention factor)
    of a ``longrope`` rope_scaling dict, as HF transformers computes them.

    ``cfg`` needs ``short_factor`` and ``long_factor`` (``rotary_dim / 2`` numbers each) and
    ``original_max_position_embeddings``; ``factor`` defaults to ``max_position`` over the
    original length, ``attention_factor`` to ``sqrt(1 + log(factor) / log(original))`` (1 when
    factor <= 1).
    """
    if cfg.get("original_max_position_embeddings") is None:
        raise ValueError("longrope rope_scaling needs original_max_position_embeddings")
    original = int(cfg["original_max_position_embeddings"])
    factors = {}
    for key in ("short_factor", "long_factor"):
        values = cfg.get(key)
        if not isinstance(values, (list, tuple)) or len(values) != rotary_dim // 2:
            raise ValueError(f"longrope rope_scaling {key} must be a list of {rotary_dim // 2} "
                             f"numbers (rotary_dim / 2), got {values!r}")
        factors[key] = torch.tensor(values, dtype=torch.float32)
    factor = cfg.get("factor")
    factor = max_position / original if factor is None else float(factor)
    attention = cfg.get("attention_factor")
    if attention is None:
        attention = (1.0 if factor <= 1.0
                     else math.sqrt(1 + math.log(factor) / math.log(original)))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    base = float(cfg.get("rope_theta", 10000.0))
    return (original, 1.0 / (factors["short_factor"] * base ** exponents),
            1.0 / (factors["long_factor"] * base ** exponents), float(attention))


def _yarn_lengths(max_position: int, cfg: dict[str, Any]) -> tuple[int, float]:
    """(original length, factor) of a ``yarn`` rope_scaling dict (a missing ``factor`` is the
    ratio of ``max_position`` to the original length, as HF takes it)."""
    original = int(cfg.get("original_max_position_embeddings") or max_position)
    factor = cfg.get("factor")
    return original, (max_position / original if factor is None else float(factor))


def yarn_settings(rotary_dim: int, base: float, max_position: int,
                  cfg: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2], attention factor) of a ``yarn`` rope_scaling
    dict, as HF transformers computes them (see the module docstring)."""
    original, factor = _yarn_lengths(max_position, cfg)
    attention = cfg.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = cfg.get("mscale"), cfg.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor,
                                                                         float(mscale_all_dim))
                     if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast = float(cfg.get("beta_fast") or 32)
    beta_slow = float(cfg.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (rotary_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    extrapolation = 1 - ramp
    inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation)
                + (1.0 / pos_freqs) * extrapolation)
    return inv_freq, float(attention)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    factor = float(cfg["factor"])
    low_freq_factor = float(cfg["low_freq_factor"])
    high_freq_factor = float(cfg["high_freq_factor"])
    old_len = float(cfg["original_max_position_embeddings"])
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _cos_sin(inv_freq: torch.Tensor, length: int) -> torch.Tensor:
    """[length, rotary_dim]: cos | sin of position * inv_freq for positions 0..length-1."""
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to the first ``rotary_dim`` features of each head.

    neox style rotates the two halves of those features against each other (LLaMA, GPT-NeoX);
    gpt-j style rotates interleaved pairs (GPT-J).

    ``max_position`` is the model's ``max_position_embeddings``; with linear or dynamic scaling
    positions up to ``rope_max_positions(max_position, rope_scaling)`` are accepted. Dynamic NTK
    and LongRoPE scaling need to know which tokens belong to which sequence and how long its
    prompt is: pass ``query_lens``, ``context_lens`` and ``prompt_lens`` (see the module
    docstring).
    """

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 is_neox_style: bool = True,
                 rope_scaling: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        if rotary_dim > head_size or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and <= head_size ({head_size}), "
                             f"got {rotary_dim}")
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.is_neox_style = is_neox_style
        self.scaling_type = _scaling_type(rope_scaling)
        self.base = base
        self.original_max_position = max_position
        self.max_position = rope_max_positions(max_position, rope_scaling)
        self.dynamic_factor = (float(rope_scaling["factor"]) if self.scaling_type == "dynamic"
                               else None)
        # LongRoPE: positions of sequences longer than the original length index the long
        # table, which follows the short one in cos_sin_cache (see the module docstring).
        self.longrope_original: Optional[int] = None
        if self.scaling_type == "longrope":
            self.longrope_original, short, long, attention = longrope_settings(
                rotary_dim, max_position, {**rope_scaling, "rope_theta": base})
            cache = torch.cat((_cos_sin(short, self.longrope_original),
                               _cos_sin(long, self.max_position))) * attention
        elif self.scaling_type == "yarn":
            inv_freq, attention = yarn_settings(rotary_dim, base, max_position, rope_scaling)
            cache = _cos_sin(inv_freq, self.max_position) * attention
        else:
            inv_freq = rope_inv_freq(rotary_dim, base, rope_scaling)
            # Dynamic NTK: the table holds the unscaled frequencies, used while a sequence is no
            # longer than max_position; longer sequences are rotated with frequencies computed
            # for their length.
            table_len = max_position if self.scaling_type == "dynamic" else self.max_position
            cache = _cos_sin(inv_freq, table_len)
        # [table_len, rotary_dim]: cos | sin, the layout of cacheflow_kernels.rotary_embedding.
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    @property
    def cos_cache(self) -> torch.Tensor:
        """cos(position * inv_freq) [table_len, rotary_dim / 2] (a view of cos_sin_cache)."""
        return self.cos_sin_cache[:, :self.rotary_dim // 2]

    @property
    def sin_cache(self) -> torch.Tensor:
        """sin(position * inv_freq) [table_len, rotary_dim / 2] (a view of cos_sin_cache)."""
        return self.cos_sin_cache[:, self.rotary_dim // 2:]

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                query_lens: Optional[Sequence[int]] = None,
                context_lens: Optional[Sequence[int]] = None,
                prompt_lens: Optional[Sequence[int]] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, H*D] and key [T, Hkv*D] with rotary applied at ``positions`` [T].

        ``query_lens`` / ``context_lens`` / ``prompt_lens`` (host lists, one entry per
        sequence, as in InputMetadata; ``prompt_lens`` 0 for a sequence past its prompt) are
        used by dynamic NTK and LongRoPE scaling only (see the module docstring); without
        ``query_lens`` the whole batch is taken as one sequence of length
        ``max(positions) + 1`` (HF's rule for a batch).

        On CUDA (without dynamic scaling) the kernel of cacheflow-kernels rotates ``query`` and
        ``key`` in place and returns them; the result equals the torch code's bit for bit.

        Positions past the table raise ValueError for CPU tensors. CUDA positions are not
        checked here: reading their maximum would synchronize the device in every layer of
        every step. The engine never forms them (sequences end at ``max_model_len``, which
        ``build_model_config`` keeps within the model's positions).
        """
        if (positions.numel() and not positions.is_cuda
                and int(positions.max()) >= self.max_position):
            raise ValueError(f"position {int(positions.max())} is past the rotary table "
                             f"({self.max_position} positions)")
        if self.longrope_original is not None:
            positions = self._longrope_rows(positions, query_lens, context_lens, prompt_lens)
        ck = self._kernels(positions, query, key)
        if ck is not None:
            ck.rotary_embedding(positions, query, key, self.cos_sin_cache, self.head_size,
                                self.is_neox_style)
            return query, key
        if self.dynamic_factor is not None:
            cos, sin = self._dynamic_cos_sin(positions, query_lens, context_lens, prompt_lens)
        else:
            cos = self.cos_cache[positions]
            sin = self.sin_cache[positions]
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def forward_with_cache(self, positions: torch.Tensor, query: torch.Tensor,
                           key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                           k_scale: float = 1.0, v_scale: float = 1.0) -> bool:
        """Rotates ``query`` and ``key`` in place and writes the rotated key and ``value``
        ([T, Hkv*D]) into their cache slots in one kernel
        (``cacheflow_kernels.rotary_embedding_with_cache``: the results of :meth:`forward`
        followed by the attention backend's ``reshape_and_cache``). Returns False, having done
        nothing, where that kernel does not apply (CPU, dynamic NTK or LongRoPE scaling,
        partial rotary, layouts it does not take: see ``kernels.rotary_cache_applies``)."""
        if (self.kernel_table(positions, query, key) is None
                or not rotary_cache_applies(query, key, value, key_cache, value_cache)):
            return False
        cacheflow_kernels.rotary_embedding_with_cache(
            positions, query, key, value, self.cos_sin_cache, self.head_size,
            self.is_neox_style, key_cache, value_cache, slot_mapping.contiguous(), k_scale,
            v_scale)
        return True

    def kernel_table(self, positions: torch.Tensor, query: torch.Tensor,
                     key: torch.Tensor) -> Optional[torch.Tensor]:
        """``cos_sin_cache`` when a kernel may rotate ``query`` and ``key`` itself with this
        table's rows at ``positions`` (full rotary without dynamic NTK or LongRoPE scaling, int64
        CUDA positions: the conditions of :meth:`forward_with_cache`), else None."""
        if (self.longrope_original is not None or self.rotary_dim != self.head_size
                or self._kernels(positions, query, key) is None):
            return None
        return self.cos_sin_cache

    def _kernels(self, positions: torch.Tensor, query: torch.Tensor,
                 key: torch.Tensor) -> Any:
        """cacheflow_kernels when its rotary kernel applies to these tensors, else None."""
        if (self.dynamic_factor is not None or positions.numel() == 0
                or positions.dtype != torch.int64 or not positions.is_contiguous()
                or positions.device != query.device or query.dim() != 2 or key.dim() != 2
                or query.stride(-1) != 1 or key.stride(-1) != 1
                or self.cos_sin_cache.device != query.device
                or self.cos_sin_cache.dtype != torch.float32):
            return None
        return kernels_for(query, key)

    def _longrope_rows(self, positions: torch.Tensor, query_lens: Optional[Sequence[int]],
                       context_lens: Optional[Sequence[int]],
                       prompt_lens: Optional[Sequence[int]]) -> torch.Tensor:
        """Rows of cos_sin_cache for ``positions``: shifted past the short table for the tokens
        rotated for a length past the original one (``max(L, p + 1) > original``)."""
        original = self.longrope_original
        assert original is not None
        if query_lens is None or context_lens is None:
            # One sequence (HF's rule for a batch): its length is the largest position + 1.
            long = (positions.max() >= original).expand(positions.shape) if positions.numel() \
                else positions.bool()
        elif all(q == 1 for q in query_lens):
            # Decode: each token's length is its position + 1 (device-only, so a CUDA graph can
            # capture it).
            long = positions >= original
        else:
            lengths = _prompt_lengths(positions, query_lens, context_lens, prompt_lens)
            per_seq = torch.tensor([n > original for n in lengths], device=positions.device)
            long = per_seq.repeat_interleave(torch.tensor(list(query_lens),
                                                          device=positions.device))
            long = long | (positions >= original)
        return positions + long.to(positions.dtype) * original

    def _dynamic_cos_sin(self, positions: torch.Tensor, query_lens: Optional[Sequence[int]],
                         context_lens: Optional[Sequence[int]],
                         prompt_lens: Optional[Sequence[int]]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rotary_dim / 2]: each token at position ``p`` of a sequence with prompt
        length ``L`` rotated with the dynamic NTK frequencies of the length ``max(L, p + 1)``."""
        if query_lens is None or context_lens is None:
            total = positions.numel()
            query_lens = [total]
            context_lens = [int(positions.max()) + 1 if total else 0]
            prompt_lens = None
        lengths = _prompt_lengths(positions, query_lens, context_lens, prompt_lens)
        last = self.original_max_position - 1
        cos = self.cos_cache[positions.clamp(max=last)]
        sin = self.sin_cache[positions.clamp(max=last)]
        start = 0
        for q_len, ctx_len, prompt_len in zip(query_lens, context_lens, lengths):
            first = ctx_len - q_len  # the position of the sequence's first new token
            # Tokens up to the prompt's end share its length; each later one has its own.
            runs = [(start, min(q_len, max(0, prompt_len - first)), prompt_len)]
            runs += [(start + j, 1, first + j + 1) for j in range(runs[0][1], q_len)]
            for row, count, length in runs:
                if count and length > self.original_max_position:
                    self._fill_dynamic(positions, cos, sin, row, count, length)
            start += q_len
        return cos, sin

    def _fill_dynamic(self, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      row: int, count: int, length: int) -> None:
        """Rows ``row .. row + count - 1`` of cos and sin with the frequencies of ``length``."""
        inv_freq = dynamic_ntk_inv_freq(self.rotary_dim, self.base, self.dynamic_factor,
                                        self.original_max_position, int(length),
                                        str(positions.device))
        freqs = positions[row:row + count].float()[:, None] * inv_freq[None, :]
        cos[row:row + count] = freqs.cos()
        sin[row:row + count] = freqs.sin()

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        x = x.view(num_tokens, -1, self.head_size)
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        cos = cos.to(x.dtype)[:, None, :]
        sin = sin.to(x.dtype)[:, None, :]
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((rotated, rest), dim=-1).view(num_tokens, -1)


def _prompt_lengths(positions: torch.Tensor, query_lens: Sequence[int],
                    context_lens: Sequence[int],
                    prompt_lens: Optional[Sequence[int]]) -> list[int]:
    """Each sequence's prompt length (its context length where ``prompt_lens`` is None),
    after checking that the lists describe ``positions``."""
    if (sum(query_lens) != positions.numel() or len(query_lens) != len(context_lens)
            or (prompt_lens is not None and len(prompt_lens) != len(query_lens))):
        raise ValueError(f"query_lens {list(query_lens)}, context_lens {list(context_lens)} "
                         f"and prompt_lens {prompt_lens} do not describe {positions.numel()} "
                         "tokens")
    return list(context_lens) if prompt_lens is None else [int(n) for n in prompt_lens]
