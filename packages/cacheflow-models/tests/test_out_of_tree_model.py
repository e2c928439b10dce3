"""A model package outside this repository registers its architecture in the cacheflow.models
entry-point group, and the engine serves checkpoints of that architecture through the normal path
(build_model_config + LLMEngine)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cacheflow_models.testing import run_engine, save_tiny_checkpoint, tiny_llama_config
from cacheflow_runtime import SamplingParams

TESTS = Path(__file__).resolve().parent
PLUGIN = TESTS / "fixtures" / "plugin_pkg"

# Runs in a fresh interpreter that sees the plugin: prints the architecture the config resolved
# to, the module of the class the runtime loaded for it, and the greedy tokens.
_SERVE = """
import json, sys
from pathlib import Path
from cacheflow_models import build_model_config
from cacheflow_runtime import SamplingParams
from cacheflow_runtime.registry import load_model_class
from cacheflow_models.testing import run_engine

path, prompts, max_tokens = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
config = build_model_config(path, "float32")
params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
outputs = run_engine(path, prompts, params)
print(json.dumps({"architecture": config.architecture,
                  "module": load_model_class(config.architecture).__module__,
                  "tokens": [out.outputs[0].token_ids for out in outputs]}))
"""


def _install_plugin(tmp_path: Path) -> Path:
    """pip-installs the fixture package (built with setuptools, offline) into a target dir."""
    source = shutil.copytree(PLUGIN, tmp_path / "plugin_src")  # the build writes next to it
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--disable-pip-version-check",
                    "--target", str(target), str(source)], check=True)
    return target


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="building the plugin fixture needs setuptools in the test env")
def test_plugin_architecture_is_served(tmp_path: Path, prompt_batch: list[list[int]]) -> None:
    site = _install_plugin(tmp_path)
    assert list(site.glob("cacheflow_test_plugin-*.dist-info/entry_points.txt"))

    llama = save_tiny_checkpoint(tmp_path / "llama", tiny_llama_config())
    plugin = shutil.copytree(llama, tmp_path / "plugin_ckpt")
    config = json.loads((plugin / "config.json").read_text())
    config["architectures"] = ["TinyPluginForCausalLM"]
    (plugin / "config.json").write_text(json.dumps(config))

    prompts, max_tokens = prompt_batch[1:4], 16
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _SERVE, str(plugin), json.dumps(prompts),
                           str(max_tokens)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["architecture"] == "TinyPluginForCausalLM"
    assert result["module"] == "cacheflow_test_plugin"

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ours = [out.outputs[0].token_ids for out in run_engine(llama, prompts, params)]
    assert result["tokens"] == ours
