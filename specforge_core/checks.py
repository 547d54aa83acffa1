"""Semantic checks of a loaded config: across sections, against the target's config.json and the
hardware in ``[run]``. ``config validate`` and ``specforge plan`` print what ``check_config`` finds.

The loader already checked types, ranges and each plugin's own cross-section rule; these checks
need the target's shape (layers, hidden size, vocab, heads) or the planning arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from specforge_core import plan as P

FILL_WARN = 0.9  # warn when a GPU would be filled beyond this fraction


@attrs.define
class Problem:
    level: str  # "error" (the run cannot work) or "warning" (it works, but wastes or risks)
    key: str  # dotted config key the problem is about
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


def check_config(config: Any) -> list[Problem]:
    """All problems found (errors first). Never raises on a bad config; reports it."""
    out: list[Problem] = []

    def err(key: str, msg: str) -> None:
        out.append(Problem("error", key, msg))

    def warn(key: str, msg: str) -> None:
        out.append(Problem("warning", key, msg))

    _check_hardware(config, err, warn)
    t, src = P.load_target_config(config)
    if t is None:
        (err if config.model.target_config else warn)("model.target_config", f"not checked against the target: {src}")
    else:
        try:
            _check_target(config, t, src, err, warn)
        except (KeyError, ValueError, TypeError) as exc:
            err("model.target_config", f"{src}: cannot read the target's shape: {exc!r}")
    return sorted(out, key=lambda p: p.level != "error")


# ----------------------------------------------------------------------------------- hardware
def _check_hardware(config: Any, err, warn) -> None:
    run, inf, tr = config.run, config.inference, config.training
    nnodes, per_node, tp = P.engine_shape(config)
    if inf.num_gpus % tp:
        err("inference.num_gpus", f"{inf.num_gpus} is not a multiple of one engine's {tp} GPUs "
            f"({nnodes} node(s) x inference.gpus_per_engine {per_node})")
    if nnodes > run.nodes:
        err("inference.sglang.nnodes", f"{nnodes} but run.nodes = {run.nodes}")
    if run.gpus_per_node and per_node > run.gpus_per_node:
        err("inference.gpus_per_engine", f"{per_node} but a node has run.gpus_per_node = {run.gpus_per_node}")
    placement = P.place(config)
    if placement is None:
        return
    for msg in placement.problems:
        err("training.num_gpus" if msg.startswith("training") else "inference.num_gpus", msg)
    total = run.nodes * run.gpus_per_node
    if not placement.problems and placement.idle():
        warn("training.num_gpus", f"{placement.idle()} of {total} GPUs are idle: inference uses {inf.num_gpus}, "
             f"training {tr.num_gpus}; give the rest to training.num_gpus or inference.num_gpus")


# ------------------------------------------------------------------------------------- target
def _check_target(config: Any, t: dict, src: str, err, warn) -> None:
    m, ds, inf = config.model, config.dataset, config.inference
    L, H, V = int(t["num_hidden_layers"]), int(t["hidden_size"]), int(t["vocab_size"])
    layers = P.aux_layers(config, L)
    bad = [i for i in layers if not 1 <= i <= L - 1]
    if bad or any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        err("model.aux_layers", f"{layers} for the {L}-layer target ({src}): ids must be increasing and in 1..{L - 1}")
    if m.draft_vocab_size > V:  # the pipeline caps it at the target's vocabulary
        warn("model.draft_vocab_size", f"{m.draft_vocab_size} exceeds the target's vocab_size {V} ({src}); "
             f"the draft will use {V}")
    max_pos = int(t.get("max_position_embeddings") or 0)
    if max_pos and ds.max_seq_length > max_pos:
        err("dataset.max_seq_length", f"{ds.max_seq_length} exceeds the target's max_position_embeddings {max_pos}")
    nh = int(t["num_attention_heads"])
    _, _, tp = P.engine_shape(config)
    if nh % tp:
        divisors = [d for d in range(1, nh + 1) if nh % d == 0]
        err("inference.gpus_per_engine", f"TP size {tp} does not divide the target's {nh} attention heads; "
            f"allowed TP sizes: {divisors}")
    if inf.backend == "sglang":
        ctx = getattr(config.options("inference", "sglang"), "context_length", None)
        if ctx is not None and ctx < ds.max_seq_length:
            err("inference.sglang.context_length", f"{ctx} is shorter than dataset.max_seq_length {ds.max_seq_length}")
    if not _check_draft_file(config, t, H, V, err):
        return
    plan = P.build_plan(config)
    _check_memory(config, plan, err, warn)
    _check_mooncake(config, plan, err)


def _check_draft_file(config: Any, t: dict, H: int, V: int, err) -> bool:
    options = config.options("model", config.model.draft)
    path = getattr(options, "config", None)
    if not path:
        return True
    key = f"model.{config.model.draft}.config"
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        err(key, f"{path}: file not found")
        return False
    except json.JSONDecodeError as exc:
        err(key, f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})")
        return False
    ok = True
    expect = {"hidden_size": H, "vocab_size": V, "target_hidden_size": H, "num_hidden_layers": 1,
              "draft_vocab_size": config.model.draft_vocab_size}
    for field, want in expect.items():
        if field in raw and raw[field] != want:
            ok = False
            where = "model.draft_vocab_size" if field == "draft_vocab_size" else "the target"
            err(key, f"{path}: {field} = {raw[field]} but {where} needs {want}")
    return ok


def _check_memory(config: Any, plan: dict, err, warn) -> None:
    gpu = config.run.gpu_memory_gib * P.GiB
    if not gpu:
        return
    mem = plan["train_memory"].total
    if mem > gpu:
        err("dataset.max_seq_length", f"a training GPU needs ~{mem / P.GiB:.1f} GiB at max_seq_length "
            f"{config.dataset.max_seq_length} but has {config.run.gpu_memory_gib:g} GiB; lower max_seq_length or "
            "micro_batch_size, add trainers (fsdp2 'full' shards states) or enable activation_checkpointing")
    elif mem > FILL_WARN * gpu:
        warn("dataset.max_seq_length", f"a training GPU needs ~{mem / P.GiB:.1f} GiB of {config.run.gpu_memory_gib:g} GiB")
    inf = config.inference
    per_gpu = plan["target_weights_per_gpu"]
    if inf.backend == "sglang":
        frac = getattr(config.options("inference", "sglang"), "mem_fraction_static", 0.8)
        budget = frac * gpu
        key = "inference.sglang.mem_fraction_static"
        if per_gpu > budget:
            err(key, f"the target's weights need {per_gpu / P.GiB:.1f} GiB per GPU at TP {plan['tp']} but "
                f"{frac:g} x {config.run.gpu_memory_gib:g} GiB = {budget / P.GiB:.1f} GiB; raise TP or mem_fraction_static")
            return
        need_kv = plan["kv_per_token"] * inf.batch_size * config.dataset.max_seq_length
        if budget - per_gpu < need_kv:
            err(key, f"after {per_gpu / P.GiB:.1f} GiB of weights per GPU, {(budget - per_gpu) / P.GiB:.2f} GiB is "
                f"left for the KV cache but one batch of {inf.batch_size} x {config.dataset.max_seq_length} tokens needs "
                f"{need_kv / P.GiB:.2f} GiB")
    elif per_gpu > FILL_WARN * gpu:
        (err if per_gpu > gpu else warn)(
            "inference.gpus_per_engine", f"the target's weights need {per_gpu / P.GiB:.1f} GiB per GPU "
            f"of {config.run.gpu_memory_gib:g} GiB")


def _check_mooncake(config: Any, plan: dict, err) -> None:
    need = plan.get("mooncake")
    opts = config.options("transfer", "mooncake")
    if need is None or opts is None:
        return
    for field in ("sample_bytes", "global_segment_size", "local_buffer_size"):
        have = getattr(opts, field)
        want = getattr(need, field)
        if have and have < want:
            err(f"transfer.mooncake.{field}", f"{have:,} is smaller than the {want:,} that max_seq_length "
                f"{config.dataset.max_seq_length} and transfer.max_pool_bytes need (0 = computed)")
