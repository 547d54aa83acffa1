"""Draft quality against GPU-minutes on the reference target: regeneration speed before/after, the
target's own answers regenerated on the GPU, one or more training runs whose checkpoints are taken
as they appear, and MT-bench acceptance (K = 3, 7 by default) of the checkpoints nearest the asked
budgets. GPU time counts the regeneration the run trains on plus the run's share of the GPU from
its process start (model load and compilation included) to the checkpoint.

Stages (state kept in ``--work``; each stage fits one 10-minute device call, or run ``all``):

    bench   regeneration tokens/s, HF ``generate`` dynamic cache vs static cache + compiled decode,
            on the same prompts in one process (benchmarks/regen_speed.py)
    regen   the target's greedy answers to ShareGPT first turns for ``--regen-seconds`` with the
            faster path (degenerate, looping answers dropped and counted)
    train   the runs (``--runs``), side by side, checkpoints timed as they land
    eval    exports of the checkpoints nearest ``--minutes`` (and each run's last), ``specforge
            eval`` at every K, the table, the JSON (``--out``) and, with matplotlib, the PNG (``--plot``)

    python benchmarks/quality_curve.py all --data .carry/quality --sharegpt sharegpt-all.jsonl.gz \\
        --model /tmp/smollm2 --work /tmp/curve --runs best --minutes 3,6,10 \\
        --out benchmarks/results/quality_curve_h200.json

``bench`` and ``regen`` need CUDA; ``train`` and ``eval`` also run on the CPU (``--device cpu``, with
small ``--set`` overrides: how they were checked here). A run's ``--runs`` entry names a recipe in ``RUNS`` (overrides of configs/smollm2-sharegpt.toml and
its data: "regen+sharegpt" or "sharegpt"), optionally ``name@seed``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import (  # noqa: E402
    RECIPE,
    _convert_target,
    _gpu_shares,
    _last_metrics,
    eval_command,
    regenerate,
    run_parallel,
)

# Token-budget steps (rows of 8192 filled from the sample stream, no padding), lr 1e-3 cosine to the
# run's last step: the recipe of configs/smollm2-sharegpt.toml at a budget of minutes.
_PACKED = ["training.token_budget=true", "training.pack_tokens=8192", "training.micro_batch_size=2",
           "training.gradient_accumulation=1", "training.lr=1e-3", "training.keep_checkpoints=100"]
RUNS: dict[str, tuple[str, list[str]]] = {
    "best": ("regen+sharegpt", _PACKED),
    "sharegpt": ("sharegpt", _PACKED),
}


def _jsonl(src: Path, dst: Path) -> Path:
    """``src`` decompressed into ``dst`` (the dataset reader takes plain JSONL)."""
    if not dst.is_file():
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rt", encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
            shutil.copyfileobj(f, g)
    return dst


# ------------------------------------------------------------------------------------ stages


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Both regeneration paths on the same first ``--bench-prompts`` prompts, one process."""
    import regen_speed
    import torch

    model, tok = regen_speed.load(Path(args.model), "cuda", "bfloat16")
    prompts = regen_speed.read_prompts(Path(args.data) / "prompts.jsonl.gz", args.bench_prompts)
    rows = regen_speed.compare(model, tok, prompts, ["dynamic", "static"], args.bench_batch,
                               args.regen_max_new_tokens)
    print(regen_speed.table(rows), flush=True)
    del model
    torch.cuda.empty_cache()
    out = {"prompts": len(prompts), "batch": args.bench_batch, "max_new_tokens": args.regen_max_new_tokens,
           "rows": rows}
    (work / "bench.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def regen(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The training answers, with the path the bench found faster (static when there is no bench)."""
    cache = "static"
    if (work / "bench.json").is_file():
        rows = json.loads((work / "bench.json").read_text())["rows"]
        cache = max(rows, key=lambda r: r["tokens_per_s"])["path"]
    info = regenerate(Path(args.model), Path(args.data) / "prompts.jsonl.gz", work / "regen.jsonl",
                      budget=10**12, max_new_tokens=args.regen_max_new_tokens, batch_size=args.regen_batch,
                      deadline_s=args.regen_seconds, cache=cache)
    (work / "regen.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"regen: {info}", flush=True)
    return info


def _parse_run(spec: str) -> tuple[str, str, int]:
    name, _, seed = spec.partition("@")
    if name not in RUNS:
        raise SystemExit(f"unknown run {name!r}; known: {', '.join(RUNS)}")
    return spec.replace("@", "-s"), name, int(seed or 0)


def train(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every ``--runs`` entry at once; each checkpoint's wall time recorded when its directory is
    complete (``state.json`` written)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sharegpt = _jsonl(Path(args.sharegpt), work / "sharegpt.jsonl")
    procs: dict[str, subprocess.Popen] = {}
    starts: dict[str, float] = {}
    ckpts: dict[str, dict[int, float]] = {}
    metrics: dict[str, dict[int, dict[str, Any]]] = {}
    recipes: dict[str, str] = {}
    for spec in args.runs.split(","):
        key, name, seed = _parse_run(spec)
        data, overrides = RUNS[name]
        paths = [str(sharegpt)] + ([str(work / "regen.jsonl")] if data.startswith("regen") else [])
        cmd = [sys.executable, "-m", "specforge_core.cli", "run", str(args.recipe), f"model.target={args.model}",
               "dataset.path=[" + ",".join(f'"{p}"' for p in paths) + "]", f"run.output_dir={work / key}",
               f"run.name=curve-{key}", f"run.seed={seed}", f"dataset.cache_dir={work / 'cache' / key}",
               "logging.progress=false", "training.log_every=50", f"training.max_steps={args.steps}",
               f"training.save_every={args.save_every}", *overrides, *args.set]
        starts[key] = time.time()
        procs[key] = subprocess.Popen(cmd, stdout=open(work / f"{key}.train.log", "w"), stderr=subprocess.STDOUT,
                                      cwd=ROOT, env=env)
        ckpts[key], metrics[key], recipes[key] = {}, {}, name
    ends: dict[str, float] = {}
    rc: dict[str, int] = {}
    deadline = time.time() + args.train_deadline
    try:
        _watch(work, procs, starts, ends, rc, ckpts, metrics, deadline)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    state = {"starts": starts, "ends": ends, "rc": rc, "recipes": recipes,
             "checkpoints": {k: {str(s): t for s, t in v.items()} for k, v in ckpts.items()},
             "metrics": {k: {str(s): m for s, m in v.items()} for k, v in metrics.items()}}
    (work / "train.json").write_text(json.dumps(state, indent=1) + "\n")
    return state


def _watch(work: Path, procs: dict[str, subprocess.Popen], starts: dict[str, float], ends: dict[str, float],
           rc: dict[str, int], ckpts: dict[str, dict[int, float]], metrics: dict[str, dict[int, dict[str, Any]]],
           deadline: float) -> None:
    """Until every run has ended (or the deadline killed it): each new complete checkpoint's time."""

    def scan(key: str) -> None:
        root = work / key / "checkpoints"
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            m = re.fullmatch(r"step-(\d+)", d.name)  # not the .tmp directories being written
            if m and int(m[1]) not in ckpts[key] and (d / "COMPLETE").is_file():
                step = int(m[1])
                ckpts[key][step] = time.time()
                metrics[key][step] = _last_metrics(work / f"{key}.train.log")
                print(f"{key}: checkpoint step {step} at {ckpts[key][step] - starts[key]:.0f}s "
                      f"{metrics[key][step]}", flush=True)

    while len(rc) < len(procs):
        for key, p in procs.items():
            scan(key)
            if key not in rc and p.poll() is not None:
                rc[key], ends[key] = p.returncode, time.time()
                scan(key)  # the last one, written just before the process ended
                print(f"{key}: rc {p.returncode} after {ends[key] - starts[key]:.0f}s", flush=True)
            elif key not in rc and time.time() > deadline:
                p.kill()
                rc[key], ends[key] = -9, time.time()
                print(f"{key}: killed at the training deadline", flush=True)
        time.sleep(0.5)


def _gpu_s_until(intervals: dict[str, tuple[float, float]], key: str, t: float) -> float:
    """``key``'s share of the GPU from its start to ``t`` (runs sharing the GPU split it)."""
    cut = {k: (a, min(b, t)) for k, (a, b) in intervals.items() if a < t}
    return _gpu_shares(cut).get(key, 0.0)


def evaluate_points(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    state = json.loads((work / "train.json").read_text())
    regen_info = json.loads((work / "regen.json").read_text()) if (work / "regen.json").is_file() else None
    intervals = {k: (state["starts"][k], state["ends"][k]) for k in state["starts"]}
    regen_users = [k for k in intervals if RUNS[state["recipes"][k]][0].startswith("regen")]
    regen_share = (regen_info["wall_s"] / max(len(regen_users), 1)) if regen_info else 0.0
    points: list[dict[str, Any]] = []
    for key, steps in state["checkpoints"].items():
        by_gpu = {int(s): _gpu_s_until(intervals, key, t) + (regen_share if key in regen_users else 0.0)
                  for s, t in steps.items()}
        wanted = {max(by_gpu)} if by_gpu else set()
        for m in args.minutes:
            if by_gpu:
                wanted.add(min(by_gpu, key=lambda s: abs(by_gpu[s] - 60 * m)))
        for s in sorted(wanted):
            points.append({"run": key, "step": s, "gpu_s": by_gpu[s], "last": s == max(by_gpu), "eval": {},
                           "train_log": state["metrics"][key].get(str(s), {})})
    for pt in points:  # exports one after the other (CPU work, seconds each)
        key, step = pt["run"], pt["step"]
        name = state["recipes"][key]
        pt["export"] = str(work / key / f"export-{step}")
        if not Path(pt["export"]).is_dir():
            cmd = [sys.executable, "-m", "specforge_core.cli", "export", str(args.recipe),
                   f"model.target={args.model}", f"run.output_dir={work / key}", *RUNS[name][1], *args.set,
                   "--checkpoint", str(work / key / "checkpoints" / f"step-{step:06d}"), "--output", pt["export"]]
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    report = {(i, k): work / f"eval-{p['run']}-{p['step']}-k{k}.json"
              for k in (int(x) for x in args.ks.split(",")) for i, p in enumerate(points)}
    jobs = [((i, k), eval_command(Path(points[i]["export"]), Path(args.model), Path(args.data) / "mtbench.jsonl",
                                  k, path, max_new_tokens=args.max_new_tokens, device=args.device,
                                  max_prompts=args.max_prompts or None), Path(f"{path}.log"))
            for (i, k), path in report.items()]

    def done(key: tuple[int, int], code: int, seconds: float) -> None:
        i, k = key
        if code == 0:
            rep = json.loads(report[key].read_text())["overall"]
            points[i]["eval"][str(k)] = {"tau": rep["tau"], "rates": rep["accept_rates"]}
        print(f"eval {points[i]['run']} step {points[i]['step']} K={k}: rc {code} "
              f"{points[i]['eval'].get(str(k), {}).get('tau')}", flush=True)

    run_parallel(jobs, args.eval_parallel, args.eval_deadline, done)
    return {"points": points, "regen": regen_info}


# ------------------------------------------------------------------------------------ report


def table(results: dict[str, Any]) -> str:
    ks = sorted({k for p in results["points"] for k in p["eval"]}, key=int)
    head = "| run | step | GPU-min | " + " | ".join(f"tau K={k}" for k in ks) + " | train acc_0 |"
    out = [head, "|" + "---|" * (4 + len(ks))]
    for p in sorted(results["points"], key=lambda p: (p["run"], p["step"])):
        acc = (p.get("train_log") or {}).get("acc", [None])[0]
        out.append(f"| {p['run']} | {p['step']} | {p['gpu_s'] / 60:.1f} | "
                   + " | ".join(f"{p['eval'][k]['tau']:.3f}" if k in p["eval"] else "-" for k in ks)
                   + f" | {acc if acc is not None else '-'} |")
    return "\n".join(out)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    runs = sorted({p["run"] for p in results["points"]})
    for run in runs:
        pts = sorted((p for p in results["points"] if p["run"] == run), key=lambda p: p["gpu_s"])
        for k, marker in (("3", "o"), ("7", "s")):
            xs = [p["gpu_s"] / 60 for p in pts if k in p["eval"]]
            ys = [p["eval"][k]["tau"] for p in pts if k in p["eval"]]
            if xs:
                ax.plot(xs, ys, marker=marker, label=f"{run} K={k}")
    ax.set_xlabel(f"GPU-minutes ({results.get('device', 'GPU')}, regeneration + training)")
    ax.set_ylabel("MT-bench acceptance length (tau)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=("all", "bench", "regen", "train", "eval", "report"))
    ap.add_argument("--data", default=".carry/quality", help="quality.py prepare output (prompts, MT-bench, GGUF)")
    ap.add_argument("--sharegpt", default="reference/data/sharegpt.jsonl", help="ShareGPT JSONL(.gz) trained on")
    ap.add_argument("--model", default="reference/smollm2-135m-instruct")
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--work", default="/tmp/curve")
    ap.add_argument("--runs", default="best", help="comma-separated RUNS names, each optionally @seed")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    ap.add_argument("--bench-prompts", type=int, default=1024)
    ap.add_argument("--bench-batch", type=int, default=1024)
    ap.add_argument("--regen-seconds", type=float, default=90)
    ap.add_argument("--regen-batch", type=int, default=1024)
    ap.add_argument("--regen-max-new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2400, help="each run's training.max_steps (its LR schedule)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--train-deadline", type=float, default=900)
    ap.add_argument("--minutes", type=lambda s: [float(x) for x in s.split(",")], default=[3.0, 6.0, 10.0],
                    help="GPU-minutes whose nearest checkpoints are evaluated (each run's last always is)")
    ap.add_argument("--ks", default="3,7")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-prompts", type=int, default=0, help="MT-bench prompts evaluated (0: all 80)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eval-parallel", type=int, default=6)
    ap.add_argument("--eval-deadline", type=float, default=300)
    ap.add_argument("--out", default="benchmarks/results/quality_curve.json")
    ap.add_argument("--plot", default="", help="PNG of tau against GPU-minutes (needs matplotlib)")
    args = ap.parse_args(argv)

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    _convert_target(Path(args.data).resolve(), Path(args.model).resolve())
    args.model = str(Path(args.model).resolve())
    stages = ("bench", "regen", "train", "eval") if args.stage == "all" else (args.stage,)
    t0 = time.time()
    if "bench" in stages:
        bench(args, work)
    if "regen" in stages:
        regen(args, work)
    if "train" in stages:
        train(args, work)
    if "eval" in stages:
        import torch

        results = evaluate_points(args, work)
        results["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        results["bench"] = json.loads((work / "bench.json").read_text()) if (work / "bench.json").is_file() else None
        results["args"] = {k: v for k, v in vars(args).items()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.stage == "report" or "eval" in stages:
        results = json.loads(Path(args.out).read_text())
        if results.get("bench"):
            import regen_speed

            print(regen_speed.table(results["bench"]["rows"]))
        print(table(results))
        if args.plot:
            plot(results, Path(args.plot))
    print(f"stages {','.join(stages)} in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
