"""The plugin kit's ``top1_agreement`` (HF's top-1 on our own sequence, position by position), on
the CPU. (``save_tiny_checkpoint(train_steps=...)`` is exercised by the GPU agreement tests: a
useful training takes about 600 steps, half a minute on a 2-core CPU.)"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from cacheflow_models.testing import (
    prompt_batch,
    run_engine,
    save_tiny_checkpoint,
    tiny_llama_config,
    top1_agreement,
)
from cacheflow_runtime import SamplingParams

NEW_TOKENS = 8


def test_top1_agreement_counts_each_position(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / "llama", tiny_llama_config())
    prompts = prompt_batch((3, 17))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = run_engine(path, prompts, params)
    assert top1_agreement(path, prompts, outputs, dtype=torch.float32, device="cpu") == 1.0

    # A wrong last token is one miss: the earlier positions' contexts are unchanged.
    tampered = copy.deepcopy(outputs)
    ids = tampered[1].outputs[0].token_ids
    ids[-1] = 3 if ids[-1] != 3 else 4
    share = top1_agreement(path, prompts, tampered, dtype=torch.float32, device="cpu")
    assert share == (2 * NEW_TOKENS - 1) / (2 * NEW_TOKENS)

