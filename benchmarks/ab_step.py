"""Before/after of the draft training step in one device call: ``draft_step.py`` of several source
trees (e.g. ``git archive <rev> | tar -x -C .before``), each (tree, T) in its own process, the trees
interleaved and repeated so drift of the machine shows up as spread, not as a difference.

    python benchmarks/ab_step.py --tree before=.before --tree head=. --T 2048 8192 --repeats 2

Each process runs the tree's own ``benchmarks/draft_step.py --T <T> --variants <v> --no-check``
(one T per process: one static flex kernel, as the trainer compiles it for a fixed length). The
table gives the median ms/step over the repeats, the range, and the ratio to the first tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_one(tree: Path, T: int, variant: str, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(tree / "benchmarks" / "draft_step.py"), "--T", str(T), "--variants", variant,
               "--no-check", "--longest", "--profile-T", "0", "--iters", str(iters),
               "--json", os.path.join(out, "r.json")]
        proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"status": f"rc {proc.returncode}: {proc.stderr[-400:]}"}
        runs = json.load(open(os.path.join(out, "r.json")))["runs"]
    return next((r for r in runs if r["T"] == T and r["variant"] == variant), {"status": "missing"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="name=path of a source tree")
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--variant", default="v4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "ab_step.json"))
    a = ap.parse_args()
    trees = [(s.split("=", 1)[0], Path(s.split("=", 1)[1]).resolve()) for s in a.tree]
    results: dict[str, dict[int, list[dict]]] = {name: {T: [] for T in a.T} for name, _ in trees}
    for rep in range(a.repeats):
        for T in a.T:
            order = trees if rep % 2 == 0 else trees[::-1]  # alternate who goes first
            for name, path in order:
                r = run_one(path, T, a.variant, a.iters)
                results[name][T].append(r)
                print(json.dumps({"tree": name, "rep": rep, **{k: r.get(k) for k in ("T", "ms", "mfu", "status")}}),
                      flush=True)
                with open(a.json, "w") as f:
                    json.dump(results, f, indent=1)

    first = trees[0][0]
    print(f"\nvariant {a.variant}, {a.repeats} processes per (tree, T), median of {a.iters} steps each")
    print(f"{'T':>6} {'tree':10} {'ms/step':>9} {'range':>17} {'MFU':>6} {'vs ' + first:>9}")
    for T in a.T:
        base = None
        for name, _ in trees:
            ms = [r["ms"] for r in results[name][T] if r.get("status") == "ok"]
            if not ms:
                print(f"{T:>6} {name:10} failed: {results[name][T][0].get('status')}")
                continue
            med = statistics.median(ms)
            base = med if name == first else base
            mfu = statistics.median(r["mfu"] for r in results[name][T] if r.get("status") == "ok")
            ratio = f"{med / base:8.3f}x" if base else "-"
            print(f"{T:>6} {name:10} {med:9.1f} {min(ms):8.1f}-{max(ms):<8.1f} {mfu * 100:5.1f}% {ratio:>9}")


if __name__ == "__main__":
    main()
