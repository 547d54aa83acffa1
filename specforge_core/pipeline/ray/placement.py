"""Where the actors go: Ray placement groups for inference engines and trainer ranks.

With GPUs in the cluster, an engine's bundle holds ``inference.gpus_per_engine`` GPUs (one node:
its tensor-parallel group) and each trainer rank one GPU; both groups are packed (soft: they spill
over nodes when one is not enough, e.g. inference on node A and training on node B). Without
GPUs, every actor gets a CPU slice, which is how tests and CPU smoke runs place them.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.define
class Placement:
    use_gpu: bool
    num_engines: int
    num_trainers: int
    engine_options: list[dict]  # .options(...) kwargs per engine
    trainer_options: list[dict]  # .options(...) kwargs per trainer rank
    groups: list[Any]  # placement groups to remove at the end

    def describe(self) -> str:
        kind = "GPU" if self.use_gpu else "CPU"
        return f"{self.num_engines} inference engine(s) and {self.num_trainers} trainer rank(s) on {kind}"


def plan_placement(config: Any, timeout_s: float = 120.0) -> Placement:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    inf, tr = config.inference, config.training
    if inf.num_gpus % inf.gpus_per_engine:
        raise ValueError(
            f"inference.num_gpus = {inf.num_gpus} is not a multiple of inference.gpus_per_engine = "
            f"{inf.gpus_per_engine}"
        )
    engines, trainers = inf.num_gpus // inf.gpus_per_engine, tr.num_gpus
    total = ray.cluster_resources()
    use_gpu = total.get("GPU", 0) > 0
    if use_gpu:
        need = inf.num_gpus + tr.num_gpus
        if total["GPU"] < need:
            raise ValueError(
                f"inference.num_gpus + training.num_gpus = {need} GPUs, but the Ray cluster has "
                f"{int(total['GPU'])}"
            )
        engine_bundle = {"GPU": inf.gpus_per_engine, "CPU": 1}
        trainer_bundle = {"GPU": 1, "CPU": 1}
    else:
        # CPU slices: the whole cluster's CPUs shared by every actor (fractions are fine in Ray)
        share = min(1.0, total.get("CPU", 1) / (engines + trainers + 1))
        engine_bundle = trainer_bundle = {"CPU": share}
    groups = [
        placement_group([dict(engine_bundle) for _ in range(engines)], strategy="PACK"),
        placement_group([dict(trainer_bundle) for _ in range(trainers)], strategy="PACK"),
    ]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=2, timeout=timeout_s)
    if len(ready) < 2:
        for g in groups:
            ray.util.remove_placement_group(g)
        raise RuntimeError(
            f"Ray could not place {engines} engine(s) x {engine_bundle} and {trainers} trainer(s) x "
            f"{trainer_bundle} within {timeout_s:.0f} s; cluster resources: {total}"
        )

    def opts(group: Any, i: int, bundle: dict) -> dict:
        return {
            "num_cpus": bundle.get("CPU", 0),
            "num_gpus": bundle.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        }

    return Placement(
        use_gpu=use_gpu, num_engines=engines, num_trainers=trainers,
        engine_options=[opts(groups[0], i, engine_bundle) for i in range(engines)],
        trainer_options=[opts(groups[1], i, trainer_bundle) for i in range(trainers)],
        groups=groups,
    )


def remove(placement: Placement) -> None:
    import ray

    for g in placement.groups:
        try:
            ray.util.remove_placement_group(g)
        except Exception:  # already removed / cluster gone
            pass
