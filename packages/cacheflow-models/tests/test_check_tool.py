"""``cacheflow-models check``: passes on faithful ports of tiny checkpoints, and on a broken
port exits non-zero naming the layer where the outputs diverge."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cacheflow_models.check import main
from cacheflow_models.testing import (
    LLAMA_ROPE_SCALING,
    save_tiny_checkpoint,
    tiny_llama_config,
    tiny_qwen2_config,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAST = ["--prompts", "Hello there", "The tiny model says:", "--max-tokens", "8"]


def _row(output: str, check: str) -> str:
    """The verdict and detail of one row of the table."""
    match = re.search(rf"^{re.escape(check)}\s+(PASS|FAIL|WARN|SKIP)\s+(.*)$", output, re.M)
    assert match, f"no row {check!r} in:\n{output}"
    return f"{match.group(1)} {match.group(2)}"


def test_console_script_is_registered() -> None:
    (script,) = entry_points(group="console_scripts", name="cacheflow-models")
    assert script.value == "cacheflow_models.check:main"


TINY_MODELS = {
    "llama": (tiny_llama_config(), FAST),
    "qwen2": (tiny_qwen2_config(), FAST),
    # Prompts and generations past the 24 trained positions; the second prompt is shorter than
    # what the first left behind in HF's (stateful) dynamic rotary, which the check resets.
    "llama_dynamic_rope": (tiny_llama_config(**LLAMA_ROPE_SCALING["dynamic"]),
                           ["--prompts", "Hello there, how are you today?",
                            "The tiny model says: once", "--max-tokens", "8"]),
}


@pytest.mark.parametrize("model", sorted(TINY_MODELS))
def test_check_passes_on_tiny_models(model: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    config, prompts = TINY_MODELS[model]
    path = save_tiny_checkpoint(tmp_path / "ckpt", config)
    assert main(["check", str(path), "--tp-sizes", "2,3,4", *prompts]) == 0
    out = capsys.readouterr().out
    assert _row(out, "weight coverage").startswith("PASS all ")
    for i in range(2):
        assert _row(out, f"greedy tokens, prompt {i}").startswith("PASS 8/8 tokens equal HF's")
    assert _row(out, "max logprob difference").startswith("PASS")
    assert _row(out, "hidden states per layer").startswith("PASS 2 layers within")
    assert _row(out, "tensor parallel, tp=2").startswith("PASS")
    assert _row(out, "tensor parallel, tp=3") == "SKIP 4 attention heads are not divisible by 3"
    assert _row(out, "tensor parallel, tp=4").startswith("PASS")
    assert out.rstrip().endswith("verdict: PASS")


def test_check_names_the_divergent_layer_of_a_broken_port(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))
    config = tiny_llama_config(num_hidden_layers=3, num_key_value_heads=4)  # square q_proj
    path = save_tiny_checkpoint(tmp_path / "ckpt", config)
    code = main(["check", str(path), "--tp-sizes", "2", *FAST,
                 "--model-class", "broken_port:TransposedQProjLlamaForCausalLM"])
    out = capsys.readouterr().out
    assert code == 1
    assert _row(out, "weight coverage").startswith("PASS")  # the shapes fit: loading can't tell
    assert _row(out, "hidden states per layer").startswith("FAIL outputs diverge at layer 1:")
    assert "FAIL" in _row(out, "greedy tokens, prompt 0")
    assert _row(out, "tensor parallel, tp=2").startswith("PASS")  # consistently broken
    assert "verdict: FAIL" in out


def test_check_fails_on_a_tensor_left_over(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = save_tiny_checkpoint(tmp_path / "ckpt", tiny_llama_config())
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert main(["check", str(path), *FAST]) == 1
    row = _row(capsys.readouterr().out, "weight coverage")
    assert row.startswith("FAIL") and "model.layers.0.mlp.extra.weight" in row
    assert str(path / "model.safetensors") in row


def test_check_reports_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
