"""New / base per decode case from the bench_{base,new}_<pass>.json reports of
tools/gpu_kernel_ab.sh (bench_paged_attention.py): the fastest pass of each, and the new wheel's
speed against SDPA on the gathered K/V (first pass).

    python tools/kernel_ab_table.py OUT_DIR
"""

from __future__ import annotations

import json
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


def main(out: Path) -> None:
    """Prints the table."""
    base, new = load(out, "base"), load(out, "new")
    print(f"{'case':34s} {'base us':>9s} {'new us':>9s} {'new/base':>9s} {'SDPA us':>9s} "
          f"{'new x SDPA':>10s}")
    for name, n in new.items():
        b = base.get(name)
        if not n["us"] or not b or not b["us"]:
            print(f"{name:34s} (no time: see the logs)")
            continue
        nu, bu = min(n["us"]), min(b["us"])
        sdpa = n["sdpa"] or b["sdpa"]
        vs = f"{sdpa / nu:10.3f}" if sdpa else f"{'-':>10s}"
        print(f"{name:34s} {bu:9.2f} {nu:9.2f} {nu / bu:9.3f} {sdpa or 0:9.2f} {vs}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
