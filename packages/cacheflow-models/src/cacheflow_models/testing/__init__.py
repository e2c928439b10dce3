"""Test helpers for model ports, in-tree or in a plugin package (installed with
cacheflow-models, needing only pytest besides).

- tiny checkpoints: ``save_tiny_checkpoint(path, config)`` (random float32 weights spread wide
  enough to avoid near-ties, or with ``train_steps`` trained briefly for decisive logits; saved
  with ``save_pretrained`` plus a byte-level tokenizer), ``byte_tokenizer()``,
  ``BYTE_VOCAB_SIZE`` and ``tiny_*_config`` builders with ``*_VARIANTS`` for the built-in
  architectures;
- fidelity: ``prompt_batch()``, ``check_greedy_fidelity(path, prompts, new_tokens)`` (greedy
  ids identical to HF ``generate``, logprobs within 1e-4), ``run_engine``, ``hf_greedy``,
  ``top1_agreement`` (half-precision runs: HF's top-1 on our own sequence, per position);
- loading: ``load_tiny_model``, ``load_with_weights`` (strict-loading error tests),
  ``checkpoint_tensors``, ``assert_same_parameters``, ``assert_tp_shards_roundtrip``.

See docs/adding_a_new_model.md for a walk-through.
"""

from cacheflow_models.testing.checkpoints import *  # noqa: F401,F403
from cacheflow_models.testing.checkpoints import __all__ as _checkpoint_names
from cacheflow_models.testing.fidelity import (
    LOGPROB_TOLERANCE,
    check_greedy_fidelity,
    hf_greedy,
    prompt_batch,
    run_engine,
    top1_agreement,
)
from cacheflow_models.testing.loading import (
    assert_same_parameters,
    assert_tp_shards_roundtrip,
    checkpoint_tensors,
    load_tiny_model,
    load_with_weights,
)

__all__ = [
    *_checkpoint_names,
    "LOGPROB_TOLERANCE",
    "assert_same_parameters",
    "assert_tp_shards_roundtrip",
    "check_greedy_fidelity",
    "checkpoint_tensors",
    "hf_greedy",
    "load_tiny_model",
    "load_with_weights",
    "prompt_batch",
    "run_engine",
    "top1_agreement",
]
