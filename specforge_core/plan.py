"""``specforge plan``: what a config would do, computed without starting anything.

Placement (which GPUs of which node run inference engines and which train), bytes of hidden states
per token and per sample, transfer-store sizes, the draft's parameter count and the memory each
training GPU needs at ``dataset.max_seq_length``. The formulas are in docs/planning.md; every
function here is plain arithmetic on the config and the target's config.json (no torch, no
weights), so ``config validate`` (specforge_core.checks) reuses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import attrs

from specforge_core.build import algorithm, create
from specforge_core.components import KINDS, capability
from specforge_core.dtypes import nbytes as dtype_bytes
from specforge_core.hfconfig import read_config_json
from specforge_core.hookspecs import selected
from specforge_core.target import aux_layers, with_aux_layers  # noqa: F401  (plan and checks size with them)

GiB = 1024**3
MiB = 1024**2
# Per token besides the hidden states: input_ids int64, target_argmax int64, loss_mask uint8.
TOKEN_EXTRA_BYTES = 8 + 8 + 1
LOGIT_BYTES = 4  # draft logits, log-softmax and target probabilities are kept in fp32


# ------------------------------------------------------------------------------------ target
def find_target_config(config: Any) -> tuple[Optional[dict], str]:
    """(target config dict or None, where it came from / why it is missing).

    ``model.target_config`` (a file or a directory with config.json) wins; otherwise a local
    ``model.target`` directory. A hub id is not fetched (planning must work offline; the runs read
    it with ``target.load_target_config``).
    """
    candidates = [config.model.target_config, config.model.target]
    for i, raw in enumerate(candidates):
        if not raw:
            continue
        path = Path(raw)
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            try:
                return read_config_json(path), str(path)
            except ValueError as exc:
                return None, str(exc)
        if i == 0:
            return None, f"model.target_config = {raw!r}: no such file or directory"
    if config.model.target:
        return None, (f"model.target = {config.model.target!r} is not a local directory; set "
                      "model.target_config to a local copy of its config.json to check against it")
    return None, "model.target is empty"


def target_params(t: dict) -> dict[str, int]:
    """Parameter counts of the target by group (dense Llama/Qwen, Qwen-MoE, DeepSeek-V3 MLA+MoE).

    Groups: 'embed' (embedding + untied lm_head), 'dense' (attention, dense MLPs, shared experts,
    routers, norms) and 'experts' (routed experts, the part a 4-bit checkpoint quantizes).
    """
    H, L, V = int(t["hidden_size"]), int(t["num_hidden_layers"]), int(t["vocab_size"])
    nh = int(t["num_attention_heads"])
    nkv = int(t.get("num_key_value_heads") or nh)
    hd = int(t.get("head_dim") or H // nh)
    embed = V * H * (1 if t.get("tie_word_embeddings") else 2)
    if t.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek-V2/V3, Kimi-K2)
        qr, kr = int(t.get("q_lora_rank") or 0), int(t["kv_lora_rank"])
        nope, rope, vd = int(t["qk_nope_head_dim"]), int(t["qk_rope_head_dim"]), int(t["v_head_dim"])
        q = (H * qr + qr + qr * nh * (nope + rope)) if qr else H * nh * (nope + rope)
        attn = q + H * (kr + rope) + kr + kr * nh * (nope + vd) + nh * vd * H
    else:
        attn = H * nh * hd + 2 * H * nkv * hd + nh * hd * H
        if str(t.get("model_type", "")).startswith(("qwen3", "gemma3")):
            attn += 2 * hd  # per-head RMSNorm on q and k
        if t.get("attention_bias") or t.get("model_type") == "qwen2":
            attn += (nh + 2 * nkv) * hd + (H if t.get("model_type") != "qwen2" else 0)  # q/k/v(/o) biases
    n_experts = int(t.get("n_routed_experts") or t.get("num_experts") or 0)
    dense_mlp = 3 * H * int(t["intermediate_size"])
    if n_experts:
        moe_i = int(t["moe_intermediate_size"])
        n_dense = int(t.get("first_k_dense_replace") or 0)
        shared = int(t.get("n_shared_experts") or 0) * 3 * H * moe_i
        if t.get("shared_expert_intermediate_size"):  # Qwen-MoE style shared expert
            shared = 3 * H * int(t["shared_expert_intermediate_size"])
        n_moe = L - n_dense
        experts = n_moe * n_experts * 3 * H * moe_i
        dense = L * (attn + 2 * H) + n_dense * dense_mlp + n_moe * (shared + H * n_experts) + H
    else:
        experts = 0
        norms = 4 if str(t.get("model_type", "")).startswith(("gemma2", "gemma3")) else 2  # + pre/post-feedforward
        dense = L * (attn + dense_mlp + norms * H) + H
    return {"embed": embed, "dense": dense, "experts": experts}


def target_weight_bytes(t: dict, dtype_bytes: int = 2) -> int:
    """Bytes of the target's weights as served: 4-bit routed experts for a compressed-tensors int4
    checkpoint (0.5 B + a bf16 scale per group), 1 B for fp8 checkpoints, else ``dtype_bytes``."""
    p = target_params(t)
    q = t.get("quantization_config") or {}
    method = q.get("quant_method", "")
    dense_b, expert_b = float(dtype_bytes), float(dtype_bytes)
    if method == "fp8":
        dense_b = expert_b = 1.0
    elif method == "compressed-tensors":
        weights = next(iter((q.get("config_groups") or {}).values()), {}).get("weights", {})
        bits, group = int(weights.get("num_bits", 16)), int(weights.get("group_size") or 0)
        if bits < 16:
            expert_b = bits / 8 + (2 / group if group else 0)
    return int(p["embed"] * dtype_bytes + p["dense"] * dense_b + p["experts"] * expert_b)


def kv_bytes_per_token(t: dict, tp: int, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token needs on one TP rank on *every* layer (MLA's latent cache is
    replicated per rank): what a sequence holds while its whole prompt is prefilled, sliding layers
    included (see ``kv_bytes``)."""
    return len(kv_layer_windows(t)) * _kv_layer_bytes_per_token(t, tp, dtype_bytes)


def _kv_layer_bytes_per_token(t: dict, tp: int, dtype_bytes: int) -> int:
    if t.get("kv_lora_rank"):
        return (int(t["kv_lora_rank"]) + int(t["qk_rope_head_dim"])) * dtype_bytes
    nh = int(t["num_attention_heads"])
    nkv = int(t.get("num_key_value_heads") or nh)
    hd = int(t.get("head_dim") or int(t["hidden_size"]) // nh)
    return 2 * max(1, nkv // tp) * hd * dtype_bytes


def kv_layer_windows(t: dict) -> list[Optional[int]]:
    """Per target layer, its attention window: ``sliding_window`` for a ``sliding_attention`` entry of
    ``layer_types`` (Gemma 2/3, Qwen with use_sliding_window, GPT-OSS, Cohere 2), None for a layer that
    attends to every token."""
    L = int(t["num_hidden_layers"])
    types, window = t.get("layer_types"), t.get("sliding_window")
    if not isinstance(types, list) or len(types) != L or not isinstance(window, int) or window <= 0:
        return [None] * L
    return [window if kind == "sliding_attention" else None for kind in types]


def kv_bytes(t: dict, tp: int, tokens: int, dtype_bytes: int = 2, in_flight: Optional[int] = None) -> int:
    """KV-cache bytes one sequence of ``tokens`` tokens holds on one TP rank. A sliding layer keeps the
    last ``window - 1`` computed tokens plus the ``in_flight`` ones being computed (vLLM's
    ``SlidingWindowSpec``: "the last sliding_window-1 computed tokens plus the in-flight tokens";
    transformers' ``DynamicSlidingWindowLayer`` keeps window - 1 between forwards, in_flight 0), at
    most ``tokens``. ``in_flight`` None = all of them: a prompt prefilled in one chunk (a capture)
    holds every token on every layer; decoding holds window - 1 + 1 per sliding layer."""
    per_layer = _kv_layer_bytes_per_token(t, tp, dtype_bytes)
    in_flight = tokens if in_flight is None else in_flight
    held = [tokens if w is None else min(tokens, w - 1 + in_flight) for w in kv_layer_windows(t)]
    return sum(held) * per_layer


# ------------------------------------------------------------------------------------- draft
def draft_algorithm(config: Any, registry: Any = None) -> Any:
    """The configured draft algorithm (cheap to build: no weights)."""
    return algorithm(config, registry)


def component_options(config: Any, kind: str) -> Any:
    """The options object of the component ``config`` selects for ``kind`` (None if it has none)."""
    return config.options(KINDS[kind].section, selected(config, kind))


def train_state_split(config: Any) -> tuple[int, bool]:
    """(ranks the fp32 trainable state is sharded over, whether it lives in CPU memory), from the
    strategy's options (``train_state_split``; default: replicated, on the GPU)."""
    split = capability(component_options(config, "training_strategy"), "ComponentOptions.train_state_split")
    return split(config.training.num_gpus) if split is not None else (1, False)


@attrs.define
class TrainMemory:
    """Bytes per training GPU, by part."""

    weights: int  # fp32 master weights (sharded) + compute-dtype copy
    grads: int
    optimizer: int  # AdamW exp_avg + exp_avg_sq
    frozen: int  # frozen target weights the draft trains against (embedding, target head rows...)
    activations: int  # saved for backward by the algorithm's objective at max_seq_length
    workspace: int  # the loss's transient buffers (chunks of logits, precomputed target distributions)

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.frozen + self.activations + self.workspace


def train_memory(config: Any, draft: Any, loss: Any = None) -> TrainMemory:
    """Memory per training GPU from the algorithm's ``DraftPlan`` and the loss's workspace."""
    tr = config.training
    trainable = draft.trainable_params
    c = dtype_bytes(tr.dtype)
    n, offloaded = train_state_split(config)
    state = 0 if offloaded else 1  # sharded fp32 state in CPU memory
    compute_copy = trainable * c if c != 4 else 0  # bf16 params all-gathered for forward/backward
    tokens = tr.micro_batch_size * (tr.pack_tokens or config.dataset.max_seq_length)  # packed rows: pack_tokens
    vd = int(draft.shape.get("draft_vocab_size", config.model.draft_vocab_size))
    workspace = capability(loss, "Loss.workspace_bytes")
    return TrainMemory(
        weights=4 * trainable // n * state + compute_copy,
        grads=4 * trainable // n * state,
        optimizer=8 * trainable // n * state,
        frozen=draft.frozen_bytes,
        activations=tokens * draft.activation_bytes_per_token + draft.activation_bytes_fixed,
        workspace=workspace(tokens, vd) if workspace is not None else 0,
    )


# ----------------------------------------------------------------------------------- transfer
def hidden_bytes_per_token(hidden_size: int, n_aux: int, dtype_bytes: int) -> int:
    """aux (n_aux*H) + final (H) hidden states in the inference dtype, + ids, argmax, loss mask."""
    return (n_aux + 1) * hidden_size * dtype_bytes + TOKEN_EXTRA_BYTES


# ---------------------------------------------------------------------------------- placement
def engine_shape(config: Any) -> tuple[int, int, int]:
    """(nodes one engine spans, GPUs it uses on each, TP size); the nodes from the backend's
    options (``engine_nodes``, default 1)."""
    inf = config.inference
    nodes = capability(component_options(config, "target_backend"), "ComponentOptions.engine_nodes")
    nnodes = nodes() if nodes is not None else 1
    return nnodes, inf.gpus_per_engine, nnodes * inf.gpus_per_engine


@attrs.define
class Placement:
    roles: list[list[str]]  # node -> GPU -> role ("" = idle)
    problems: list[str]  # why the config does not fit the hardware (errors)

    def idle(self) -> int:
        return sum(r == "" for node in self.roles for r in node)


def place(config: Any) -> Optional[Placement]:
    """Engines first (each on ``nnodes`` consecutive nodes), then trainer ranks on what is left."""
    run, inf, tr = config.run, config.inference, config.training
    if not run.gpus_per_node:
        return None
    roles = [["" for _ in range(run.gpus_per_node)] for _ in range(run.nodes)]
    problems: list[str] = []
    nnodes, per_node, tp = engine_shape(config)
    if inf.num_gpus % tp:
        problems.append(f"inference.num_gpus = {inf.num_gpus} is not a multiple of the engine size {tp} "
                        f"(nnodes {nnodes} x inference.gpus_per_engine {per_node})")
    for e in range(inf.num_gpus // tp):
        start = next((n for n in range(run.nodes - nnodes + 1)
                      if all(roles[n + k].count("") >= per_node for k in range(nnodes))), None)
        if start is None:
            problems.append(f"inference engine {e} (TP {tp}: {per_node} GPUs on each of {nnodes} node(s)) "
                            f"does not fit on {run.nodes} node(s) x {run.gpus_per_node} GPUs")
            break
        rank = 0
        for k in range(nnodes):
            free = [g for g, r in enumerate(roles[start + k]) if r == ""][:per_node]
            for g in free:
                roles[start + k][g] = f"engine {e} tp{rank}"
                rank += 1
    placed = 0
    for node in roles:
        for g, r in enumerate(node):
            if r == "" and placed < tr.num_gpus:
                node[g] = f"trainer {placed}"
                placed += 1
    if placed < tr.num_gpus:
        problems.append(f"training.num_gpus = {tr.num_gpus} but only {placed} GPUs are left after inference "
                        f"({run.nodes} node(s) x {run.gpus_per_node} GPUs)")
    return Placement(roles, problems)


# --------------------------------------------------------------------------------------- plan
def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:  # plan needs no torch; without it there is no GPU to run on here either
        return False
    return torch.cuda.is_available()


def build_plan(config: Any, registry: Any = None) -> dict[str, Any]:
    """Every number ``specforge plan`` prints, as a dict (also used by tests and checks); ``registry``:
    the one a ``Pipeline(registry=...)`` runs with (None: the installed entry points)."""
    plan: dict[str, Any] = {"placement": place(config)}
    t, src = find_target_config(config)
    plan["target_source"] = src
    if t is None:
        return plan
    H, L = int(t["hidden_size"]), int(t["num_hidden_layers"])
    n_aux = len(aux_layers(config, L, registry))
    T = config.dataset.max_seq_length
    hb = dtype_bytes(config.inference.dtype)
    per_token = hidden_bytes_per_token(H, n_aux, hb)
    plan.update(target=t, n_aux=n_aux, aux_layers=aux_layers(config, L, registry), bytes_per_token=per_token,
                bytes_per_sample=per_token * T)
    plan["pool_samples"] = config.transfer.max_pool_bytes // (per_token * T)
    algo = draft_algorithm(config, registry)
    # the algorithm sizes the layers the run will capture (unvalidated: `config validate` reports bad ids)
    dp = algo.plan(attrs.evolve(config, model=attrs.evolve(config.model, aux_layers=plan["aux_layers"])), t)
    plan.update(draft=dp.shape, draft_source=dp.source, draft_plan=dp,
                draft_trainable=dp.trainable_params, draft_frozen=dp.frozen_params)

    plan["train_memory"] = train_memory(config, dp, create(config, "loss", registry=registry))
    nnodes, per_node, tp = engine_shape(config)
    weights = target_weight_bytes(t, hb)
    plan.update(tp=tp, target_weights=weights, target_weights_per_gpu=weights // tp,
                kv_per_token=kv_bytes_per_token(t, tp, hb),
                kv_sliding_layers=sum(w is not None for w in kv_layer_windows(t)),
                kv_decode_bytes=kv_bytes(t, tp, T, hb, in_flight=1))
    # components' own notes (facts stored under their name, printed lines, config problems)
    plan["notes"] = {}
    for kind in KINDS:
        name = selected(config, kind)
        notes_fn = capability(config.options(KINDS[kind].section, name), "ComponentOptions.plan_notes")
        if notes_fn is not None:
            notes = notes_fn(config, plan)
            plan["notes"][name] = notes
            if notes.facts is not None:
                plan[name] = notes.facts
    return plan


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _human(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_plan(config: Any, plan: dict[str, Any], problems: list) -> str:
    out: list[str] = []
    add = out.append
    run, inf, tr = config.run, config.inference, config.training
    nnodes, per_node, tp = engine_shape(config)
    add(f"run {run.name!r}: pipeline {run.pipeline}, {run.nodes} node(s) x "
        f"{run.gpus_per_node or '?'} GPUs" + (f" ({run.gpu_memory_gib:g} GiB each)" if run.gpu_memory_gib else ""))
    add("")
    add("placement")
    add(f"  inference: backend {inf.backend}, {inf.num_gpus} GPUs = {inf.num_gpus // tp} engine(s) x TP {tp} "
        f"({per_node} GPUs on each of {nnodes} node(s))")
    add(f"  training:  strategy {tr.strategy}, {tr.num_gpus} trainer rank(s), 1 GPU each")
    placement = plan["placement"]
    if placement is None:
        add("  (run.gpus_per_node = 0: hardware unknown, no per-GPU placement)")
    else:
        for n, node in enumerate(placement.roles):
            groups: list[tuple[str, list[int]]] = []
            for g, role in enumerate(node):
                key = role.split(" tp")[0] if role.startswith("engine") else ("trainers" if role else "idle")
                if groups and groups[-1][0] == key:
                    groups[-1][1].append(g)
                else:
                    groups.append((key, [g]))
            parts = []
            for key, gpus in groups:
                span = f"{gpus[0]}-{gpus[-1]}" if len(gpus) > 1 else f"{gpus[0]}"
                if key == "trainers":
                    ranks = [node[g].split()[1] for g in gpus]
                    parts.append(f"GPU {span}: trainer rank {ranks[0]}-{ranks[-1]}" if len(ranks) > 1
                                 else f"GPU {span}: trainer rank {ranks[0]}")
                elif key == "idle":
                    parts.append(f"GPU {span}: idle")
                else:
                    rs = [node[g].split("tp")[1] for g in gpus]
                    parts.append(f"GPU {span}: {key} (TP ranks {rs[0]}-{rs[-1]})" if len(rs) > 1
                                 else f"GPU {span}: {key} (TP rank {rs[0]})")
            add(f"  node {n}: " + "; ".join(parts))
    add("")
    if "target" not in plan:
        add(f"target: {plan['target_source']} (byte and memory figures need it)")
    else:
        t, d, T = plan["target"], plan["draft"], config.dataset.max_seq_length
        add(f"target ({plan['target_source']}): {t['num_hidden_layers']} layers, hidden {t['hidden_size']}, "
            f"vocab {t['vocab_size']}, aux layers {plan['aux_layers']}")
        add(f"  weights {_gib(plan['target_weights'])} -> {_gib(plan['target_weights_per_gpu'])} per GPU at TP {tp}; "
            f"KV cache {plan['kv_per_token'] / 1024:.1f} KiB/token per GPU")
        if plan.get("kv_sliding_layers"):
            full = plan["kv_per_token"] * T
            add(f"  {plan['kv_sliding_layers']} of {t['num_hidden_layers']} layers slide (window "
                f"{t['sliding_window']}): a {T}-token prompt holds every token while it is prefilled "
                f"({full / MiB:.1f} MiB, what a capture needs), a decoding sequence of {T} tokens "
                f"{plan['kv_decode_bytes'] / MiB:.1f} MiB")
        add("")
        dt = "auto: bf16 on GPU" if inf.dtype == "auto" else inf.dtype
        add(f"hidden states ({dt} = {dtype_bytes(inf.dtype)} B): {plan['bytes_per_token']:,} B/token "
            f"= ({plan['n_aux']}+1) x {t['hidden_size']} x {dtype_bytes(inf.dtype)} + {TOKEN_EXTRA_BYTES}")
        if inf.dtype == "auto" and not _has_cuda():
            add("  this machine has no GPU: a run here keeps hidden states in fp32 ('auto' on CPU), twice these bytes")
        add(f"  per sample at max_seq_length {T}: {plan['bytes_per_sample']:,} B ({plan['bytes_per_sample'] / MiB:.1f} MiB)")
        add(f"  transfer.max_pool_bytes {_gib(config.transfer.max_pool_bytes)} holds {plan['pool_samples']} full-length samples")
        for notes in plan.get("notes", {}).values():
            for line in notes.lines:
                add(f"  {line}")
        add("")
        keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "draft_vocab_size")
        if all(k in d for k in keys):  # a transformer-layer draft: the familiar one-line shape
            shape = (f"hidden {d['hidden_size']}, intermediate {d['intermediate_size']}, heads "
                     f"{d['num_attention_heads']}/{d['num_key_value_heads']} x {d['head_dim']}, draft vocab "
                     f"{d['draft_vocab_size']}")
        else:
            shape = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d.items())
        add(f"draft ({plan['draft_source']}): {shape}")
        add(f"  parameters: {plan['draft_trainable']:,} trainable ({_human(plan['draft_trainable'])}), "
            f"{plan['draft_frozen']:,} frozen embedding ({_human(plan['draft_frozen'])})")
        m: TrainMemory = plan["train_memory"]
        note = plan["draft_plan"].memory_note
        add(f"  memory per training GPU at max_seq_length {T}, micro_batch {tr.micro_batch_size}"
            + (f", {note}" if note else "") + ":")
        for name in ("weights", "grads", "optimizer", "frozen", "activations", "workspace"):
            add(f"    {name:<12}{_gib(getattr(m, name)):>12}")
        add(f"    {'total':<12}{_gib(m.total):>12}" + (f" of {run.gpu_memory_gib:g} GiB" if run.gpu_memory_gib else ""))
    if problems:
        add("")
        for p in problems:
            add(f"{p.level}: {p}")
    return "\n".join(out) + "\n"
