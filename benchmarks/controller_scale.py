#!/usr/bin/env python
"""How many samples/s can the Ray pipeline's metadata path dispatch? (no GPU, no tensors)

The real ``ControllerActor`` and ``InferenceManager`` are driven by simulated inference engines
(one Ray actor each, returning ``ResultBatch`` columns at once, without a model or a store) and
simulated trainer ranks (one Ray actor each, pulling ``--pull-steps`` optimizer steps per call as
one ``RankWork`` and acknowledging ``consumed`` / ``trained`` columns on the next pull). Everything
the controller and manager do for a real run happens; only the model work is gone, so the rate is
the metadata path's ceiling. Each row also gives the CPU seconds each hop used over the timed part
(``/proc``), and the rate those seconds would allow with all cores to themselves.

    python benchmarks/controller_scale.py                       # 64 engines, 64 ranks
    python benchmarks/controller_scale.py --engines 8 16 64 --ranks 64 --json out.json

Prints one table row per configuration: dispatched samples/s (samples handed to trainer ranks and
acknowledged as trained, over the wall time from the first prompt to the last ack).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


COLUMNS = ("engines", "ranks", "samples", "engine_batch", "pull_steps", "startup_s", "wall_s", "samples_per_s")


class SimEngine:
    """Stands in for ``EngineActor``: same constructor shape and methods, metadata only."""

    def __init__(self, run_id: str, bytes_per_token: int):
        import numpy  # noqa: F401  (the wire format's arrays; a real engine has it loaded)

        self.run_id, self.bpt = run_id, bytes_per_token

    def ready(self) -> bool:
        return True

    def generate(self, prompts: tuple) -> tuple:
        # ``PromptBatch`` / ``ResultBatch`` wire tuples: plain numpy columns, no specforge import
        seq, index, num_tokens = prompts
        keys = [f"{self.run_id}/s{s}" for s in seq.tolist()]  # a real engine names its keys too
        return seq, index, keys, num_tokens, num_tokens * self.bpt

    def close(self) -> None:
        pass


class SimRank:
    """One simulated trainer rank (its own Ray actor, like ``TrainerActor``): pulls several steps
    per call and acknowledges them (consumed + trained, as columns) on its next pull."""

    def __init__(self, rank: int, controller):
        # Receiving the controller's handle makes Ray import its module, which (through
        # specforge_core.pipeline -> config -> components) imports torch: seconds of CPU and ~200 MB
        # per process. A real trainer has torch loaded anyway, so it is paid here, before the clock.
        import numpy  # noqa: F401

        self.rank, self.controller = rank, controller

    def run(self, max_steps: int, min_steps: int) -> tuple[int, float]:
        controller = self.controller
        import numpy as np
        import ray

        empty = np.zeros(0, np.int64)
        consumed, tseq, tidx = empty, empty, empty
        done, wait_s = 0, 0.0
        while True:
            t = time.perf_counter()
            work = ray.get(controller.pull.remote(self.rank, max_steps, 1.0, min_steps, consumed, tseq, tidx))
            wait_s += time.perf_counter() - t
            if work is None:
                return done, wait_s
            # ``RankWork`` wire tuple: (steps, positions, micro_per_step, micro_sizes, samples, discard)
            samples, discard = work[4], work[5]
            consumed = np.concatenate([samples[0], discard[0]]) if len(discard[0]) else samples[0]
            tseq, tidx = samples[0], samples[1]
            done += len(tseq)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _system_pids() -> list[int]:
    """raylet, gcs_server and the other Ray daemons of this session (best effort)."""
    try:
        import ray._private.worker as w

        return [p.process.pid for infos in w._global_node.all_processes.values() for p in infos]
    except Exception:
        return []


def run_one(engines: int, ranks: int, steps: int, batch: int, pull_steps: int, depth: int) -> dict:
    import ray

    from specforge_core.pipeline.ray.controller import ControllerActor, Prompt
    from specforge_core.pipeline.ray.inference import InferenceManager

    per_step = ranks  # micro_batch_size 1 x ranks
    prompts = [Prompt(s * per_step + j, (s * per_step + j) % 10_000, 256 + (j * 37) % 512, s)
               for s in range(steps) for j in range(per_step)]
    positions = {s: {"epoch": 0, "index": (s + 1) * per_step} for s in range(steps)}
    t_start = time.perf_counter()
    controller = ray.remote(ControllerActor).options(num_cpus=0).remote(
        prompts, positions, num_ranks=ranks, micro_batch_size=1, max_pool_bytes=1 << 40)
    manager = ray.remote(InferenceManager).options(num_cpus=0).remote(
        SimEngine, [{"num_cpus": 0}] * engines, ("bench", 4096),
        batch_size=batch, max_inflight_per_engine=depth, max_restarts=0)
    sim_ranks = [ray.remote(SimRank).options(num_cpus=0).remote(r, controller) for r in range(ranks)]
    ray.get(manager.ready.remote())
    ray.get([r.__ray_ready__.remote() for r in sim_ranks])
    ray.get(controller.summary.remote())
    startup = time.perf_counter() - t_start
    engine_handles = [ray.get(manager.engine_handle.remote(i)) for i in range(engines)]
    pids = {"controller": [_pid(controller)], "manager": [_pid(manager)],
            "engines": [_pid(e) for e in engine_handles], "ranks": [_pid(r) for r in sim_ranks],
            "ray daemons": _system_pids(), "driver": [os.getpid()]}
    cpu0 = {k: [_cpu_s(p) for p in v] for k, v in pids.items()}
    t0 = time.perf_counter()
    m = manager.run.remote(controller)
    got = ray.get([r.run.remote(pull_steps, pull_steps) for r in sim_ranks])
    wall = time.perf_counter() - t0
    mstats = ray.get(m)
    cpu = {k: round(sum(_cpu_s(p) - c for p, c in zip(v, cpu0[k], strict=True)), 2) for k, v in pids.items()}
    cpu_total = sum(cpu.values())
    trained = sum(n for n, _ in got)
    summary = ray.get(controller.summary.remote())
    assert summary["trained"] == trained == len(prompts), (summary, trained)
    assert summary["held_keys"] == 0 and summary["pool_bytes"] == 0, summary
    for a in [controller, manager, *sim_ranks]:
        ray.kill(a)
    return {"engines": engines, "ranks": ranks, "samples": len(prompts), "engine_batch": batch,
            "pull_steps": pull_steps, "startup_s": round(startup, 1), "wall_s": round(wall, 2),
            "samples_per_s": round(len(prompts) / wall),
            # CPU seconds per hop over the timed part; the rate if those seconds had all the cores
            "cpu_s": cpu, "cpu_total_s": round(cpu_total, 2),
            "cpu_bound_samples_per_s": round(len(prompts) / max(cpu_total / (os.cpu_count() or 1), 1e-9)),
            "manager_exchange_s": mstats["exchange_s"], "manager_wait_s": mstats["wait_s"],
            "manager_loops": mstats["loops"], "engine_calls": mstats["batches"],
            "rank_calls_wait_s_mean": round(sum(w for _, w in got) / len(got), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=int, nargs="+", default=[64])
    ap.add_argument("--ranks", type=int, nargs="+", default=[64])
    ap.add_argument("--samples", type=int, default=32768, help="samples per configuration (rounded to steps)")
    ap.add_argument("--engine-batch", type=int, default=128, help="prompts per engine call (results pushed per call)")
    ap.add_argument("--pull-steps", type=int, default=64, help="optimizer steps a rank pulls per call")
    ap.add_argument("--depth", type=int, default=2, help="batches in flight per engine")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    args = ap.parse_args()

    import ray
    from rich.console import Console
    from rich.table import Table

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             object_store_memory=150_000_000)
    rows = []
    for e in args.engines:
        for r in args.ranks:
            rows.append(run_one(e, r, max(1, args.samples // r), args.engine_batch, args.pull_steps, args.depth))
            print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    table = Table(title=f"controller metadata path ({os.cpu_count()} CPU cores)")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in COLUMNS))
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
