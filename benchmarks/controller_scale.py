#!/usr/bin/env python
"""How many samples/s can the Ray pipeline's metadata path dispatch? (no GPU, no tensors)

The real ``ControllerActor`` and ``InferenceManager`` are driven by simulated inference engines
(Ray actors that return ``Result`` metadata at once, without running a model or touching a store)
and simulated trainer ranks (threads in a few Ray actors that pull their assignments in batches and
report ``consumed`` / ``trained`` in one call per pull). Everything the controller and manager do
for a real run happens; only the model work is gone, so the rate is the metadata path's ceiling.

    python benchmarks/controller_scale.py                       # 64 engines, 64 ranks
    python benchmarks/controller_scale.py --engines 8 16 64 --ranks 64 --json out.json

Prints one table row per configuration: dispatched samples/s (samples handed to trainer ranks and
acknowledged as trained, over the wall time from the first prompt to the last ack).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class SimEngine:
    """Stands in for ``EngineActor``: same constructor shape and methods, metadata only."""

    def __init__(self, run_id: str, bytes_per_token: int):
        self.run_id, self.bpt = run_id, bytes_per_token

    def ready(self) -> bool:
        return True

    def generate(self, prompts):
        from specforge_core.pipeline.ray.dispatch import Result

        return [Result(p.seq, p.index, f"{self.run_id}/s{p.seq}", p.num_tokens, p.num_tokens * self.bpt)
                for p in prompts]

    def close(self) -> None:
        pass


class SimRanks:
    """Several simulated trainer ranks (one thread each) in one process."""

    def __init__(self, ranks: list[int]):
        self.ranks = ranks

    def run(self, controller, pull_max: int) -> int:
        import ray

        done = [0] * len(self.ranks)

        def loop(i: int, rank: int) -> None:
            seqs: list[int] = []
            pairs: list[tuple[int, int]] = []
            while True:
                # acks of the previous batch ride on the next pull: one controller call per batch
                got = ray.get(controller.pull.remote(rank, pull_max, 1.0, min_n=pull_max, consumed=seqs, trained=pairs))
                seqs, pairs = [], []
                if got is None:
                    return
                for a in got:
                    for mb in a.micro:
                        for r in mb:
                            seqs.append(r.seq)
                            pairs.append((r.seq, r.index))
                done[i] += len(pairs)

        threads = [threading.Thread(target=loop, args=(i, r)) for i, r in enumerate(self.ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(done)


def run_one(engines: int, ranks: int, rank_procs: int, steps: int, batch: int, pull_max: int, depth: int) -> dict:
    import ray

    from specforge_core.pipeline.ray.controller import ControllerActor, Prompt
    from specforge_core.pipeline.ray.inference import InferenceManager

    per_step = ranks  # micro_batch_size 1 x ranks
    prompts = [Prompt(s * per_step + j, (s * per_step + j) % 10_000, 256 + (j * 37) % 512, s)
               for s in range(steps) for j in range(per_step)]
    positions = {s: {"epoch": 0, "index": (s + 1) * per_step} for s in range(steps)}
    controller = ray.remote(ControllerActor).options(num_cpus=0).remote(
        prompts, positions, num_ranks=ranks, micro_batch_size=1, max_pool_bytes=1 << 40)
    manager = ray.remote(InferenceManager).options(num_cpus=0, max_concurrency=4).remote(
        SimEngine, [{"num_cpus": 0}] * engines, ("bench", 4096),
        batch_size=batch, max_inflight_per_engine=depth, max_restarts=0)
    per_proc = -(-ranks // rank_procs)
    groups = [ray.remote(SimRanks).options(num_cpus=0, max_concurrency=2).remote(list(range(r, min(r + per_proc, ranks))))
              for r in range(0, ranks, per_proc)]
    ray.get(manager.ready.remote())
    ray.get([g.__ray_ready__.remote() for g in groups])
    t0 = time.perf_counter()
    m = manager.run.remote(controller)
    trained = sum(ray.get([g.run.remote(controller, pull_max) for g in groups]))
    mstats = ray.get(m)
    print(mstats)
    wall = time.perf_counter() - t0
    summary = ray.get(controller.summary.remote())
    assert summary["trained"] == trained == len(prompts), (summary, trained)
    for a in [controller, manager, *groups]:
        ray.kill(a)
    return {"engines": engines, "ranks": ranks, "samples": len(prompts), "engine_batch": batch,
            "pull_max": pull_max, "wall_s": round(wall, 2), "samples_per_s": round(len(prompts) / wall)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=int, nargs="+", default=[64])
    ap.add_argument("--ranks", type=int, nargs="+", default=[64])
    ap.add_argument("--rank-procs", type=int, default=8, help="processes hosting the simulated ranks")
    ap.add_argument("--samples", type=int, default=32768, help="samples per configuration (rounded to steps)")
    ap.add_argument("--engine-batch", type=int, default=32, help="prompts per engine call (results pushed per call)")
    ap.add_argument("--pull-max", type=int, default=32, help="assignments a rank pulls per call")
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
            rows.append(run_one(e, r, min(args.rank_procs, r), max(1, args.samples // r), args.engine_batch,
                                args.pull_max, args.depth))
            print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    table = Table(title=f"controller metadata path ({os.cpu_count()} CPU cores)")
    for col in ("engines", "ranks", "samples", "engine_batch", "pull_max", "wall_s", "samples_per_s"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("engines", "ranks", "samples", "engine_batch", "pull_max", "wall_s",
                                               "samples_per_s")))
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
