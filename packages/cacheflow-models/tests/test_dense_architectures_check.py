"""``cacheflow-models check`` passes on Qwen3, Gemma 2, Gemma 3 and Phi-3 tiny checkpoints:
every row (weight coverage, greedy tokens, logprobs, hidden states per layer, tensor-parallel
shards at 2 and 4) PASS. Gemma's sliding windows and Phi-3's longrope switch are shorter than
the prompts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cacheflow_models.check import main
from cacheflow_models.testing import save_tiny_checkpoint

from dense_testutil import variant_config

# Prompts of 29 and 26 bytes (tokens): past Gemma's 8-token windows and Phi-3's 24-token
# original length at prefill already.
PROMPTS = ["--prompts", "Hello there, how are you now?", "The tiny model says: once",
           "--max-tokens", "8"]
VARIANTS = {"qwen3_window_bias": 2, "gemma2_mqa_untied_scalar": 3, "gemma3_gqa_tied": 3,
            "phi3_longrope": 2}


def _row(output: str, check: str) -> str:
    match = re.search(rf"^{re.escape(check)}\s+(PASS|FAIL|WARN|SKIP)\s+(.*)$", output, re.M)
    assert match, f"no row {check!r} in:\n{output}"
    return f"{match.group(1)} {match.group(2)}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_check_passes(variant: str, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    path = save_tiny_checkpoint(tmp_path / variant, variant_config(variant))
    assert main(["check", str(path), "--tp-sizes", "2,4", *PROMPTS]) == 0
    out = capsys.readouterr().out
    assert _row(out, "weight coverage").startswith("PASS all ")
    for i in range(2):
        assert _row(out, f"greedy tokens, prompt {i}").startswith("PASS 8/8 tokens equal HF's")
    assert _row(out, "max logprob difference").startswith("PASS")
    assert _row(out, "hidden states per layer").startswith(f"PASS {VARIANTS[variant]} layers")
    assert _row(out, "tensor parallel, tp=2").startswith("PASS")
    assert _row(out, "tensor parallel, tp=4").startswith("PASS")
    assert out.rstrip().endswith("verdict: PASS")
