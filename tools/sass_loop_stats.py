"""Static SASS statistics of a kernel's main loop, from a cubin, without a GPU.

The decode attention kernels are latency- and issue-bound on small grids, so the instructions of
their main loop matter; this prints, for each kernel whose mangled name contains FILTER, its
instruction count, the loop (the backward branch's body) holding the most HMMA instructions, and
that loop's instructions by opcode. Counts are static: a loop's rarely taken blocks (a rescale,
a mask, a block-table refill) are included. Compare builds with it (e.g. a build option on and
off), not absolute figures.

    pip install nvidia-cuda-nvdisasm   # nvdisasm, from PyPI (the CUDA toolkit here lacks it)
    nvcc -std=c++17 -arch=sm_90a -O3 -cubin -Icsrc -I$(python -m tvm_ffi.config --includedir) \\
        [-DCACHEFLOW_PA_LDSM_V=1] probe.cu -o probe.cubin   # probe.cu: explicit instantiations
    python tools/sass_loop_stats.py probe.cubin [FILTER] [--dump]

``--dump`` also prints each loop's instructions. ``NVDISASM`` names the disassembler; by default
the one of the ``nvidia-cuda-nvdisasm`` package, then ``nvdisasm`` on PATH.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

FUNCTION = re.compile(r"^\.text\.(\S+):")
LABEL = re.compile(r"^(\.L\w+):")
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
TARGET = re.compile(r"`\((\.L\w+)\)")


def find_nvdisasm() -> str:
    """The disassembler: $NVDISASM, the nvidia-cuda-nvdisasm package's, or PATH's."""
    if os.environ.get("NVDISASM"):
        return os.environ["NVDISASM"]
    try:
        import nvidia  # the namespace package of NVIDIA's CUDA wheels

        for base in nvidia.__path__:
            for found in sorted(Path(base).glob("cu*/bin/nvdisasm")):
                return str(found)
    except ImportError:
        pass
    found = shutil.which("nvdisasm")
    if found is None:
        sys.exit("no nvdisasm: pip install nvidia-cuda-nvdisasm, or set NVDISASM")
    return found


def functions(sass: str) -> dict[str, list[str]]:
    """Mangled kernel name -> its lines of nvdisasm output."""
    out: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        match = FUNCTION.match(line)
        if match:
            current = match.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def parse(lines: list[str]) -> tuple[list[str], dict[str, int]]:
    """The instructions (text without address) and each label's instruction index."""
    instructions: list[str] = []
    labels: dict[str, int] = {}
    for line in lines:
        label = LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        match = INSTRUCTION.match(line)
        if match:
            instructions.append(match.group(2))
    return instructions, labels


def opcode(instruction: str) -> str:
    """The opcode without its modifiers or predicate (``@P0 HMMA.16816.F32 ...`` -> HMMA)."""
    words = instruction.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def main_loop(instructions: list[str], labels: dict[str, int]) -> tuple[int, int] | None:
    """(first, last) index of the backward branch's body with the most HMMA instructions."""
    loops = []
    for index, instruction in enumerate(instructions):
        if opcode(instruction) != "BRA":
            continue
        target = TARGET.search(instruction)
        if target and labels.get(target.group(1), index + 1) <= index:
            loops.append((labels[target.group(1)], index))
    if not loops:
        return None
    return max(loops, key=lambda r: sum(opcode(i) == "HMMA" for i in instructions[r[0]:r[1] + 1]))


def main() -> None:
    """Prints the statistics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cubin")
    parser.add_argument("filter", nargs="?", default="", help="part of the mangled kernel name")
    parser.add_argument("--dump", action="store_true", help="print each loop's instructions")
    args = parser.parse_args()
    sass = subprocess.run([find_nvdisasm(), "-c", args.cubin], check=True, capture_output=True,
                          text=True).stdout
    for name, lines in functions(sass).items():
        if args.filter not in name:
            continue
        instructions, labels = parse(lines)
        demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout
        print(demangled.strip() or name)
        loop = main_loop(instructions, labels)
        if loop is None:
            print(f"  {len(instructions)} instructions, no loop")
            continue
        body = instructions[loop[0]:loop[1] + 1]
        counts = collections.Counter(opcode(i) for i in body)
        print(f"  {len(instructions)} instructions; main loop {len(body)}: "
              + ", ".join(f"{op} {n}" for op, n in counts.most_common()))
        if args.dump:
            for instruction in body:
                print(f"    {instruction}")


if __name__ == "__main__":
    main()
