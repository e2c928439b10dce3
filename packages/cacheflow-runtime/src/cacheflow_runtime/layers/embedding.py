"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous range of the vocab."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cacheflow_runtime import parallel_state as ps
from cacheflow_runtime.layers.linear import copy_checked, linear


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over ranks (rows padded to divide evenly)."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 params_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        tp = ps.get_tensor_parallel_world_size()
        self.rows_per_partition = -(-num_embeddings // tp)
        self.vocab_start = ps.get_tensor_parallel_rank() * self.rows_per_partition
        self.vocab_end = min(self.vocab_start + self.rows_per_partition, num_embeddings)
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.zeros(self.rows_per_partition, embedding_dim,
                                               dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: Optional[object] = None) -> None:
        """Copies this rank's vocabulary rows of the full [vocab, dim] tensor."""
        if loaded.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"embedding: checkpoint shape {tuple(loaded.shape)} does not match "
                             f"({self.num_embeddings}, {self.embedding_dim})")
        rows = self.vocab_end - self.vocab_start
        copy_checked(param.data[:rows], loaded[self.vocab_start:self.vocab_end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeds token ids (any shape) -> [..., embedding_dim]."""
        if ps.get_tensor_parallel_world_size() == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return ps.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits, split over ranks like the embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False,
                 params_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.rows_per_partition,
                                                 dtype=self.weight.dtype), requires_grad=False)
            self.bias.weight_loader = self._bias_loader
        else:
            self.register_parameter("bias", None)

    def _bias_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                     shard_id: Optional[object] = None) -> None:
        rows = self.vocab_end - self.vocab_start
        copy_checked(param.data[:rows], loaded[self.vocab_start:self.vocab_end])

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Shares the embedding's weight (tied input and output embeddings)."""
        self.weight = embedding.weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_rows, dim] -> float logits [num_rows, vocab] gathered from every rank."""
        logits = linear(hidden_states, self.weight, self.bias)
        logits = ps.all_gather(logits, dim=-1)
        return logits[:, :self.num_embeddings]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Same as ``compute_logits``."""
        return self.compute_logits(hidden_states)
