"""The pieces of ``cacheflow-models check``: the verdict table, our engine against HF transformers
(greedy tokens, logprobs, per-layer hidden states) and the tensor-parallel shard round trip."""
