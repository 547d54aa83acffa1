"""Semantic checks of a loaded config: across sections, against the target's config.json, the
inputs on disk and the hardware in ``[run]``. The one list of checks: ``config validate`` prints
what ``check_config`` finds, ``specforge run`` runs the same before any work (an error stops it with
one line, exit 2), ``specforge plan`` prints them without the input checks.

The loader already checked types, ranges and each plugin's own cross-section rule; these checks
need the target's shape (layers, hidden size, vocab, heads) or the planning arithmetic.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import attrs

from specforge_core import plan as P
from specforge_core.components import capability

FILL_WARN = 0.9  # warn when a GPU would be filled beyond this fraction


@attrs.define
class Problem:
    level: str  # "error" (the run cannot work) or "warning" (it works, but wastes or risks)
    key: str  # dotted config key the problem is about
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


def check_config(config: Any, inputs: bool = True, registry: Any = None) -> list[Problem]:
    """All problems found (errors first). Never raises on a bad config; reports it.

    ``inputs=False`` leaves out whether the data files, the target and the output dir are there
    (``specforge plan``, ``config validate --skip-inputs``: sizing a recipe for another machine)."""
    out: list[Problem] = []

    def err(key: str, msg: str) -> None:
        out.append(Problem("error", key, msg))

    def warn(key: str, msg: str) -> None:
        out.append(Problem("warning", key, msg))

    _check_numbers(config, err)
    store = _transfer_store(config, registry) if inputs else None
    _check_inputs(config, err, warn, inputs, store)
    _check_hardware(config, err, warn)
    t, src = P.find_target_config(config)
    if t is None:
        # a local config.json that cannot be read is an error (the run reads it); a hub id is not fetched
        local = bool(config.model.target_config) or bool(config.model.target) and Path(config.model.target).is_dir()
        (err if local else warn)("model.target_config" if config.model.target_config else "model.target",
                                 f"not checked against the target: {src}")
    else:
        try:
            _check_target(config, t, src, err, warn, registry)
        except (KeyError, ValueError, TypeError) as exc:
            err("model.target_config", f"{src}: cannot read the target's shape: {exc!r}")
    if inputs and capability(store, "TransferStoreProvider.supplies_features") and not any(p.level == "error" for p in out):
        _check_feature_cache(config, store, err, registry)
    return sorted(out, key=lambda p: p.level != "error")


def _check_numbers(config: Any, err) -> None:
    """Every float setting is a number: NaN passes every range check (all comparisons are false)."""
    def walk(obj: Any, key: str) -> None:
        if isinstance(obj, float) and not math.isfinite(obj):
            err(key, f"{obj} is not a finite number")
        elif attrs.has(type(obj)):
            for a in attrs.fields(type(obj)):
                walk(getattr(obj, a.name), f"{key}.{a.name}" if key else a.name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, key)
    walk(config, "")


def _check_feature_cache(config: Any, provider: Any, err, registry: Any = None) -> None:
    """A transfer store that serves features from files: the files are there, whole, and were
    written for this config (what the run would otherwise find out after tokenizing)."""
    from specforge_core.data.features import FeatureCacheError, check_cache

    try:
        check_cache(config, provider, registry)
    except FeatureCacheError as exc:
        err("transfer.store", str(exc))
    except (ValueError, OSError) as exc:  # the tokenizer or the data the fingerprint needs cannot be read
        err("transfer.store", f"cannot check the feature cache {capability(provider, 'TransferStoreProvider.dir') or ''}: {exc}")


# ------------------------------------------------------------------------------------- inputs
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check_inputs(config: Any, err, warn, inputs: bool = True, store: Any = None) -> None:
    """What a run reads and writes, checked before any work (the run used to fail on these after
    data loading and vocab building, with a traceback)."""
    tr = config.training
    if len(tr.betas) != 2 or not all(0 <= b < 1 for b in tr.betas):
        err("training.betas", f"{list(tr.betas)}: AdamW takes two values, each in [0, 1), e.g. [0.9, 0.95]")
    if not inputs:
        return
    if not config.dataset.path:
        err("dataset.path", "empty: give at least one JSONL/JSON conversation file")
    for f in config.dataset.path:
        if not Path(f).is_file():
            err("dataset.path", f"{f}: data file not found" + (" (a directory)" if Path(f).is_dir() else ""))
        elif not _has_records(Path(f)):
            err("dataset.path", f"{f}: no records (the file is empty); give a file of conversations")
    out = Path(config.run.output_dir)
    if out.exists() and not out.is_dir():
        err("run.output_dir", f"{out} is a file; the run writes a directory there: choose another path")
    target = config.model.target
    if target:
        path = Path(target)
        if path.is_dir():
            if not (path / "config.json").is_file():
                err("model.target", f"{target}: a directory without config.json; expected a Hugging Face model folder")
            elif not _has_weights(path) and not capability(store, "TransferStoreProvider.supplies_features"):
                err("model.target", f"{target}: no weights (*.safetensors, pytorch_model*.bin) in the directory; "
                    "expected a Hugging Face model folder (an interrupted download?)")
            for st in sorted(path.glob("*.safetensors")):
                problem = _safetensors_problem(st)
                if problem:
                    err("model.target", f"{st}: {problem}; re-download or re-convert the model")
        elif path.exists():
            err("model.target", f"{target}: a file; expected a model directory or a hub id")
        elif not HUB_ID.match(target):
            err("model.target", f"{target}: no such directory (and not a hub id like 'org/name')")


def _has_records(path: Path) -> bool:
    """Not empty: a non-blank line in JSONL, or something in a JSON list (read until found)."""
    with path.open("rb") as f:
        for line in f:
            text = line.strip().lstrip(b"[").strip()
            if text and text != b"]":
                return True
    return False


def _has_weights(path: Path) -> bool:
    return any(any(path.glob(p)) for p in ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.gguf"))


def _transfer_store(config: Any, registry: Any = None) -> Any:
    """The run's transfer store provider (cheap to build: it starts nothing); None if it cannot be
    built (the loader or the plugin's own check reports why)."""
    from specforge_core.build import create

    try:
        return create(config, "transfer_store", registry=registry)
    except Exception:
        return None


def _safetensors_problem(path: Path) -> str:
    """Why a safetensors file cannot be read ('' if its header and sizes are consistent): a
    truncated download otherwise fails deep inside model loading."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "truncated (no header)"
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return "truncated or not a safetensors file (header longer than the file)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        return f"truncated: {size:,} bytes, the header needs {8 + n + end:,}"
    return ""


# ----------------------------------------------------------------------------------- hardware
def _check_hardware(config: Any, err, warn) -> None:
    run, inf, tr = config.run, config.inference, config.training
    nnodes, per_node, tp = P.engine_shape(config)
    if inf.num_gpus % tp:
        err("inference.num_gpus", f"{inf.num_gpus} is not a multiple of one engine's {tp} GPUs "
            f"({nnodes} node(s) x inference.gpus_per_engine {per_node})")
    if nnodes > run.nodes:
        err(f"inference.{inf.backend}", f"one engine spans {nnodes} nodes but run.nodes = {run.nodes}")
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
def _check_target(config: Any, t: dict, src: str, err, warn, registry: Any = None) -> None:
    m, ds = config.model, config.dataset
    L, V = int(t["num_hidden_layers"]), int(t["vocab_size"])
    layers = P.aux_layers(config, L, registry)
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
    plan = P.build_plan(config, registry)
    # the components' own checks: the draft algorithm's (e.g. its config file against the target)
    # and any component's plan_notes (e.g. a backend's context length, a store's sizes)
    problems = list(plan["draft_plan"].problems)
    for notes in plan.get("notes", {}).values():
        problems += notes.problems
    for level, key, msg in problems:
        (err if level == "error" else warn)(key, msg)
    if any(level == "error" and key.startswith("model.") for level, key, _ in problems):
        return  # the memory figures would describe a draft that cannot be built
    _check_memory(config, plan, err, warn)


def _check_memory(config: Any, plan: dict, err, warn) -> None:
    gpu = config.run.gpu_memory_gib * P.GiB
    if not gpu:
        return
    mem = plan["train_memory"].total
    if mem > gpu:
        err("dataset.max_seq_length", f"a training GPU needs ~{mem / P.GiB:.1f} GiB at max_seq_length "
            f"{config.dataset.max_seq_length} but has {config.run.gpu_memory_gib:g} GiB; lower max_seq_length or "
            "micro_batch_size, add trainers under a strategy that shards the training state, or enable "
            "activation checkpointing")
    elif mem > FILL_WARN * gpu:
        warn("dataset.max_seq_length", f"a training GPU needs ~{mem / P.GiB:.1f} GiB of {config.run.gpu_memory_gib:g} GiB")
    per_gpu = plan["target_weights_per_gpu"]
    backend = P.component_options(config, "target_backend")
    if capability(backend, "ComponentOptions.plan_notes") is not None:
        return  # the backend budgets its own GPU memory (its plan_notes reported it)
    if per_gpu > FILL_WARN * gpu:
        (err if per_gpu > gpu else warn)(
            "inference.gpus_per_engine", f"the target's weights need {per_gpu / P.GiB:.1f} GiB per GPU "
            f"of {config.run.gpu_memory_gib:g} GiB")
