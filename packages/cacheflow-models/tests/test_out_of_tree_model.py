"""The out-of-tree example package (examples/cacheflow-stablelm) installed offline into a fresh
virtual environment: its entry points register StableLmForCausalLM and the "stablelm" GGUF model
type, its own tests pass with only the helpers installed with cacheflow-models, ``LLM`` serves
a tiny StableLM checkpoint with HF transformers' greedy tokens, and ``cacheflow-models check``
passes on it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from transformers import StableLmConfig

from cacheflow_models.testing import (
    BYTE_VOCAB_SIZE,
    hf_greedy,
    prompt_batch,
    save_tiny_checkpoint,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "cacheflow-stablelm"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                                reason="building the example package needs setuptools")

# Run in the fresh environment: LLM over token-id prompts, greedy.
_SERVE = """
import json, sys
from cacheflow_runtime import SamplingParams
from cacheflow_serve import LLM
from cacheflow_runtime.registry import load_model_class

path, prompts = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(path, dtype="float32", device="cpu")
params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
print(json.dumps({"module": load_model_class("StableLmForCausalLM").__module__,
                  "tokens": [o.outputs[0].token_ids for o in outs]}))
"""


def _fresh_env(tmp_path: Path) -> Path:
    """A new venv (system site packages on) that also sees this environment's packages (torch,
    cacheflow, transformers) through a .pth file, with the example installed into it offline.
    Returns its python."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site_dir = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    ours = sysconfig.get_paths()["purelib"]
    (site_dir / "_outer_env.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    source = shutil.copytree(EXAMPLE, tmp_path / "example",
                             ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", str(source)], check=True)
    return python


def test_example_package_installs_serves_and_checks(tmp_path: Path) -> None:
    python = _fresh_env(tmp_path)
    # Installed as a distribution with both entry-point groups (not seen from this process).
    metadata = subprocess.run(
        [str(python), "-c", "from importlib.metadata import entry_points as e; import json; "
         "print(json.dumps([[p.group, p.name] for g in ('cacheflow.models', "
         "'cacheflow.gguf_model_types') for p in e(group=g) if 'stablelm' in p.value]))"],
        check=True, capture_output=True, text=True).stdout
    assert json.loads(metadata) == [["cacheflow.models", "StableLmForCausalLM"],
                                    ["cacheflow.gguf_model_types", "stablelm"]]

    # Its own tests, with the installed helpers only (one fidelity variant keeps this short).
    tests = tmp_path / "example" / "tests"
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tests), "-k", "not greedy_matches_hf or mqa_full_rotary"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "5 passed, 2 deselected" in done.stdout

    # Served by LLM with HF's greedy tokens.
    path = save_tiny_checkpoint(tmp_path / "ckpt", StableLmConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        use_parallel_residual=True, use_qkv_bias=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2))
    prompts = prompt_batch(lengths=(3, 17, 40))
    served = subprocess.run([str(python), "-c", _SERVE, str(path), json.dumps(prompts)],
                            capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    result = json.loads(served.stdout.strip().splitlines()[-1])
    assert result["module"] == "cacheflow_stablelm.model"
    assert result["tokens"] == [hf_greedy(path, p, 12)[0] for p in prompts]

    # The check tool: tokens, logprobs, per-layer states and TP shards all pass.
    check = subprocess.run([str(python), "-m", "cacheflow_models.check", "check", str(path),
                            "--max-tokens", "8", "--tp-sizes", "2"],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert "StableLmForCausalLM" in check.stdout
    assert "verdict: PASS" in check.stdout
