"""Each variant / base per decode case from the bench_<variant>_<pass>.json reports of
tools/gpu_kernel_ab.sh (bench_paged_attention.py): the fastest pass of each, and each variant's
speed against SDPA on the gathered K/V (first pass).

    python tools/kernel_ab_table.py OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def load(out: Path, variant: str) -> dict[str, dict]:
    """Case -> {"us": [time per pass], "sdpa": SDPA time or None} for one wheel's reports."""
    cases: dict[str, dict] = {}
    for report in sorted(out.glob(f"bench_{variant}_*.json")):
        for r in json.loads(report.read_text())["results"]:
            entry = cases.setdefault(r["case"], {"us": [], "sdpa": None})
            if r.get("time_us") is not None:
                entry["us"].append(r["time_us"])
            if r.get("sdpa_time_us"):
                entry["sdpa"] = r["sdpa_time_us"]
    return cases


def variants_in(out: Path) -> list[str]:
    """The variants with reports in OUT_DIR: base first, then new, then the rest by name."""
    names = {m.group(1) for p in out.glob("bench_*_*.json")
             if (m := re.fullmatch(r"bench_(.+)_\d+\.json", p.name))}
    order = [v for v in ("base", "new") if v in names]
    return order + sorted(names - set(order))


def main(out: Path) -> None:
    """Prints one row per case: base time, each variant's time and ratio to base, SDPA speedup."""
    names = variants_in(out)
    if "base" not in names or len(names) < 2:
        sys.exit(f"{out}: needs bench_base_*.json and at least one other variant's reports")
    data = {v: load(out, v) for v in names}
    others = names[1:]
    head = f"{'case':34s} {'base us':>9s} {'SDPA us':>9s}"
    for v in others:
        head += f" {v + ' us':>12s} {'/base':>6s} {'xSDPA':>6s}"
    print(head)
    for case, b in data["base"].items():
        if not b["us"]:
            print(f"{case:34s} (no base time: see the logs)")
            continue
        bu = min(b["us"])
        sdpa = b["sdpa"] or next((data[v].get(case, {}).get("sdpa") for v in others
                                  if data[v].get(case, {}).get("sdpa")), None)
        row = f"{case:34s} {bu:9.2f} {sdpa or 0:9.2f}"
        for v in others:
            n = data[v].get(case)
            if not n or not n["us"]:
                row += f" {'-':>12s} {'-':>6s} {'-':>6s}"
                continue
            nu = min(n["us"])
            row += f" {nu:12.2f} {nu / bu:6.3f} {(sdpa / nu if sdpa else 0):6.3f}"
        print(row)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
