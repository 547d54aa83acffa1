"""The EAGLE-3 draft model: fc over the target's aux features + one Llama decoder layer (or N, as
vLLM serves them) + norm + lm_head, its training-time-test (TTT) unroll, cached incremental
inference and the engine export.

Reading it against the paper (Li et al., EAGLE-3, 2025; docs/draft-model.md has the full map):

    g_t   = fc([l_t; m_t; h_t])                 fuse()            low/mid/high target features
    x     = [RMSNorm(e_{t+1}); RMSNorm(g_t)]    attn_input()      token embedding beside the feature (2H)
    q,k,v = x W_q, x W_k, x W_v  (+ rope)       qkv()
    o     = attention(q, k, v)                  attend()          TTT mask in training, KV cache in inference
    h     = g_t + o W_o                         residual_mlp()    residual from the *un-normed* g
    a_t   = h + MLP(RMSNorm(h))                 residual_mlp()
    p     = softmax(lm_head(RMSNorm(a_t)))      norm, logits()
    next step's g = a_t (EAGLE-3), or RMSNorm(a_t) (EAGLE-3.1 ``norm_output``)

With ``num_hidden_layers`` = N > 1 (vLLM's ``llama_eagle3``), layers 1..N-1 are plain pre-norm
Llama decoder layers on the hidden stream, between layer 0's a_t and the final norm:

    a   = a + attention(RMSNorm(a)) W_o;  a = a + MLP(RMSNorm(a))      ``LlamaDecoderLayer``

Their q/k/v read H (only layer 0 sees the embedding), each layer has its own KV cache and the same
attention pattern, and a_t above is the last layer's output.

``Eagle3DecoderLayer.forward`` is that list in order. Its three dense blocks are the pure functions
below (activations and weights in, no module state), so the same code runs eager (CPU, tests) or
``torch.compile``d (CUDA): ``fast(fn, compiled)`` is the only switch. Weights reach them through
``ComputeWeights``: each weight cast once per micro-step to the compute dtype (the bf16 copy of an
fp32 master, shared by the K TTT steps) and q/k/v concatenated into one GEMM.

Attribute names equal the export keys (``fc.weight``, ``midlayer.self_attn.q_proj.weight``,
``layers.1.mlp.up_proj.weight``...), so ``state_dict()`` is the export plus ``embed_tokens.weight``;
an N > 1 export names layer 0 ``layers.0.`` (``export_name``).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from specforge_llama_eagle3.attention import CAUSAL_IMPLS, ttt_attention
from specforge_llama_eagle3.config import DraftConfig

EXPORT_KEYS = (
    "fc.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
)
# one later layer's keys, under ``layers.{i}.`` (vLLM: no hidden_norm is read after layer 0)
LATER_LAYER_KEYS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


# ================================================================================ rope
def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, as the target computes them (plain, linear, llama3)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    elif rope_type != "default":
        raise ValueError(f"rope type '{rope_type}' is not supported; allowed: default, linear, llama3")
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(medium, ramp, out)


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin [..., head_dim] for integer ``positions`` of any shape."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, T, D] or [T, D] (the half-split layout HF Llama uses)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ================================================================================ the layer's math
# Pure functions of (activations, compute-dtype weights); autocast is off around them, so their
# dtypes are explicit. On CUDA they run torch.compile'd: the fp32 RMSNorms, rope, SwiGLU and
# residual adds fuse into a few kernels around the GEMMs (eager: ~6 passes over [T, H] per norm).
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in fp32, scale in the input dtype (an fp32 master weight under
    autocast must not promote the output to fp32)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w.to(x.dtype) * xf.to(x.dtype)


def attn_input(emb, hidden, w_in, w_hid, eps: float) -> torch.Tensor:
    """x = [input_layernorm(e); hidden_norm(g)] -> [B, T, 2H]."""
    return torch.cat([rms_norm(emb.to(hidden.dtype), w_in, eps), rms_norm(hidden, w_hid, eps)], dim=-1)


def qkv(x, w_qkv, cos, sin, n_heads: int, n_kv: int, head_dim: int):
    """One GEMM for q, k, v over the 2H input; rope on q and k. -> q [B, Hq, T, D], k, v [B, Hkv, T, D]."""
    B, T, _ = x.shape
    y = F.linear(x, w_qkv).view(B, T, n_heads + 2 * n_kv, head_dim).transpose(1, 2)
    q, k, v = y.split([n_heads, n_kv, n_kv], dim=1)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def residual_mlp(hidden, attn, w_o, w_post, eps: float, w_gate, w_up, w_down) -> torch.Tensor:
    """h = g + o W_o (residual from the un-normed g), then h + SwiGLU(post_attention_layernorm(h))."""
    B, _, T, _ = attn.shape
    h = hidden + F.linear(attn.transpose(1, 2).reshape(B, T, -1), w_o)
    x = rms_norm(h, w_post, eps)
    return h + F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


_COMPILED: dict[Callable, Callable] = {}


def fast(fn: Callable, compiled: bool) -> Callable:
    """``fn`` itself, or its torch.compile'd twin (compiled once per process; dynamic=None: the
    first new sequence length recompiles with a symbolic T, later ones reuse it)."""
    if not compiled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


class ComputeWeights:
    """Weights in the compute ``dtype``, each cast once for this object's life (one micro-step or
    one inference call). For fp32 master weights under bf16 autocast this is the bf16 parameter
    copy FSDP2's MixedPrecisionPolicy makes: the K TTT steps share it and their weight gradients
    accumulate into it before one cast back (autocast would cast every weight again per step).
    Several weights are concatenated along dim 0 (q/k/v: one GEMM; the input is read once)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._done: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, *weights: torch.Tensor) -> torch.Tensor:
        key = tuple(id(w) for w in weights)
        if key not in self._done:
            cast = [w.to(self.dtype) for w in weights]
            self._done[key] = cast[0] if len(cast) == 1 else torch.cat(cast)
        return self._done[key]


# ================================================================================ modules
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, w: Optional[ComputeWeights] = None, compiled: bool = False) -> torch.Tensor:
        return fast(rms_norm, compiled)(x, self.weight if w is None else w(self.weight), self.eps)


class Attention(nn.Module):
    """The attention projections (layer 0's q/k/v read the 2H input, later layers' H); the pattern is
    the caller's ``attend``."""

    def __init__(self, cfg: DraftConfig, in_dim: int):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(in_dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5


class MLP(nn.Module):
    """SwiGLU weights (``residual_mlp`` applies them)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


# attend(q [B, Hq, S, D], k, v [B, Hkv, S, D]) -> [B, Hq, S, D]: the caller's attention pattern
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Eagle3DecoderLayer(nn.Module):
    """The draft's one decoder layer (``midlayer``): it reads the token embedding and the fused
    hidden state side by side (paper: their concat, 2H wide), so q/k/v take 2H inputs."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, 2 * cfg.hidden_size)  # cat(normed embedding, normed hidden)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.eps = cfg.rms_norm_eps

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Attend, w: Optional[ComputeWeights] = None, compiled: bool = False,
                recompute: bool = False) -> torch.Tensor:
        """One draft step at every position; returns the un-normed output a_t. ``recompute``
        (activation checkpointing): keep only the inputs of the residual + MLP block, the bulk of a
        step's saved activations, and recompute it in backward."""
        w = w if w is not None else ComputeWeights(hidden.dtype)
        # x = [RMSNorm(e); RMSNorm(g)]
        x = fast(attn_input, compiled)(emb, hidden, w(self.input_layernorm.weight), w(self.hidden_norm.weight),
                                       self.eps)
        return attention_and_mlp(self, x, hidden, cos, sin, attend, w, compiled, recompute)


def attention_and_mlp(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, attend: Attend, w: ComputeWeights, compiled: bool,
                      recompute: bool) -> torch.Tensor:
    """What every draft layer does after its input norm: q, k, v from ``x`` (+ rope at the step's
    positions), o = attention under the caller's pattern (TTT mask or KV cache), then
    h = residual + o W_o and h + MLP(RMSNorm(h)). ``recompute``: the residual + MLP block is
    recomputed in backward (activation checkpointing)."""
    a, mlp = layer.self_attn, layer.mlp
    q, k, v = fast(qkv, compiled)(x, w(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), cos, sin,
                                  a.n_heads, a.n_kv, a.head_dim)
    o = attend(q, k, v)
    block = fast(residual_mlp, compiled)
    args = (residual, o, w(a.o_proj.weight), w(layer.post_attention_layernorm.weight), layer.eps,
            w(mlp.gate_proj.weight), w(mlp.up_proj.weight), w(mlp.down_proj.weight))
    return checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)


class LlamaDecoderLayer(nn.Module):
    """A draft layer after the first (vLLM's ``layer_idx > 0``): a standard pre-norm Llama layer on
    the hidden stream alone, a -> a + attn(RMSNorm(a)) W_o -> + MLP(RMSNorm(.)), q/k/v over H."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.eps = cfg.rms_norm_eps

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
                w: Optional[ComputeWeights] = None, compiled: bool = False,
                recompute: bool = False) -> torch.Tensor:
        w = w if w is not None else ComputeWeights(hidden.dtype)
        x = fast(rms_norm, compiled)(hidden, w(self.input_layernorm.weight), self.eps)
        # residual from the un-normed input, as in every Llama layer (and as layer 0 does from g)
        return attention_and_mlp(self, x, hidden, cos, sin, attend, w, compiled, recompute)


class DraftCache:
    """Per-sequence K/V of each draft layer, in append order (rope already applied).

    Every row of the batch holds the same number of entries in every layer; ``crop`` rolls back
    rejected drafts."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, L, D]
        self.v: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return 0 if 0 not in self.k else self.k[0].shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer] = k if layer not in self.k else torch.cat([self.k[layer], k], dim=2)
        self.v[layer] = v if layer not in self.v else torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]

    def crop(self, length: int) -> None:
        if length < 0 or length > len(self):
            raise ValueError(f"crop({length}): the cache holds {len(self)} entries")
        for i in self.k:
            self.k[i], self.v[i] = self.k[i][:, :, :length], self.v[i][:, :, :length]


# ================================================================================ the draft
class LlamaEagle3Draft(nn.Module):
    def __init__(
        self,
        cfg: DraftConfig,
        aux_layer_ids: Optional[Sequence[int]] = None,  # HF hidden_states indices the target captures
        target_num_layers: Optional[int] = None,
        attention: str = "auto",  # TTT causal part: "eager" (explicit), "sdpa", "flex", "auto"
        compile: str = "auto",  # torch.compile the step's dense parts: "auto" (on CUDA), "on", "off"
        activation_checkpointing: bool = False,  # TTT: recompute each step's residual + MLP in backward
    ):
        super().__init__()
        if attention not in ("auto", *CAUSAL_IMPLS):
            raise ValueError(f"attention '{attention}' is not known; allowed: auto, {', '.join(CAUSAL_IMPLS)}")
        if compile not in ("auto", "on", "off"):
            raise ValueError(f"compile '{compile}' is not known; allowed: auto, on, off")
        self.attention = attention
        self.compile = compile
        self.activation_checkpointing = activation_checkpointing
        # TTT diagonal merge (attention.ttt_attention): "auto" = compiled stacked merge when
        # compiling, else the eager loop
        self.merge = "auto"
        self.config = cfg
        self.aux_layer_ids = list(aux_layer_ids) if aux_layer_ids is not None else None
        self.target_num_layers = target_num_layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # the target's, frozen
        self.fc = nn.Linear(cfg.num_aux * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        # EAGLE-3.1 (fc_norm): each aux hidden state RMS-normed on its own before fc
        self.fc_norm = (nn.ModuleList(RMSNorm(cfg.target_hidden_size, cfg.rms_norm_eps) for _ in range(cfg.num_aux))
                        if cfg.fc_norm else None)
        self.midlayer = Eagle3DecoderLayer(cfg)
        # layers 1..N-1 under vLLM's indices (``layers.1``...); empty for the usual one-layer draft
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(cfg) for i in range(1, cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.d2t: Optional[torch.Tensor] = None  # draft id -> target id offsets (set by from_export)

    def _apply(self, fn, recurse=True):
        """``.to(bf16)`` and friends keep the RoPE frequencies fp32 (recomputed, never rounded),
        as HF and vLLM do: a bf16 ``inv_freq`` is off by up to 2**-9 relative, which puts the rope
        angle of position 2,000 off by radians."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype in (torch.bfloat16, torch.float16):  # (fp64 models keep fp64)
            cfg = self.config
            self.inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(self.inv_freq.device)
        return self

    def load_embedding(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(f"target embedding has shape {tuple(weight.shape)}; the draft expects "
                             f"{tuple(self.embed_tokens.weight.shape)} (vocab_size x hidden_size)")
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight)

    # ------------------------------------------------------------------------------ pieces
    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """g = fc([l; m; h]): [..., n_aux*H_t] target features -> [..., H] draft hidden state."""
        return self.fc(self.fc_input(aux_hidden))

    def fc_input(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """The features as fc reads them: as captured, or (EAGLE-3.1) each aux layer normed."""
        if self.fc_norm is None:
            return aux_hidden
        chunks = aux_hidden.chunk(len(self.fc_norm), dim=-1)
        return torch.cat([norm(x) for norm, x in zip(self.fc_norm, chunks, strict=True)], dim=-1)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits from a normed hidden state."""
        return self.lm_head(normed)

    @property
    def num_layers(self) -> int:
        return 1 + len(self.layers)

    def attention_modules(self) -> list[Attention]:
        """Each layer's attention, layer 0 first."""
        return [self.midlayer.self_attn, *(layer.self_attn for layer in self.layers.values())]

    def step(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, attend: Sequence[Attend],
             w: Optional[ComputeWeights] = None, compiled: bool = False,
             recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step: token ``ids`` [B, S] beside ``hidden`` [B, S, H] at rope ``positions``;
        ``attend[i]`` is layer i's attention pattern (each layer keeps its own keys).

        Returns (normed for ``logits``, the next step's hidden): a_t, or with EAGLE-3.1's
        ``norm_output`` the normed RMSNorm(a_t) (vLLM's ``aux_output``)."""
        if len(attend) != self.num_layers:
            raise ValueError(f"step: {len(attend)} attention patterns for {self.num_layers} layers")
        w = w if w is not None else ComputeWeights(hidden.dtype)
        cos, sin = cos_sin(self.inv_freq, positions, w.dtype)
        out = self.midlayer(self.embed_tokens(ids), hidden, cos, sin, attend[0], w, compiled, recompute)
        for i, layer in enumerate(self.layers.values(), start=1):
            out = layer(out, cos, sin, attend[i], w, compiled, recompute)
        normed = self.norm(out, w, compiled)
        return normed, (normed if self.config.norm_output else out)

    def _causal_impl(self, device: torch.device):
        # FlexAttention on GPU (fastest and most accurate, measured: docs/performance.md); the
        # explicit version on CPU (exact for any padding, cheap at test sizes).
        name = self.attention if self.attention != "auto" else ("flex" if device.type == "cuda" else "eager")
        return CAUSAL_IMPLS[name]

    def _compiled(self, device: torch.device) -> bool:
        return self.compile == "on" or (self.compile == "auto" and device.type == "cuda")

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype when autocast is on for ``device`` (fp32 master weights), else the
        weights' own dtype."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.fc.weight.dtype

    # ------------------------------------------------------------------------------ training
    def ttt_forward(
        self,
        input_ids: torch.Tensor,  # int64 [B, T]
        aux_hidden: torch.Tensor,  # [B, T, n_aux*H_t]
        attention_mask: torch.Tensor,  # bool [B, T]
        ttt_length: int,
        position_ids: Optional[torch.Tensor] = None,  # int64 [B, T]: packed rows (training/packing.py)
        doc_ids: Optional[torch.Tensor] = None,  # int [B, T]: packed rows' documents, -1 on padding
    ) -> Iterator[torch.Tensor]:
        """Yield the normed hidden [B, T, H] of TTT steps k = 0..ttt_length-1.

        Step k at position t reads token x_{t+k+1} with hidden = step k-1's output at t (step 0:
        fc(aux_t)), at rope position t+k; see docs/draft-model.md. In packed rows ``t`` is the
        position inside the document and attention stays inside it (a document's last positions
        read the next document's first tokens, but their outputs carry no loss and only they
        themselves attend to them: the diagonal keys)."""
        T = input_ids.shape[1]
        device = input_ids.device
        scale = self.midlayer.self_attn.scale
        key_valid = attention_mask.bool() if doc_ids is None else doc_ids
        base_pos = torch.arange(T, device=device) if position_ids is None else position_ids
        causal = self._causal_impl(device)
        on = self._compiled(device)
        merge = self.merge if self.merge != "auto" else ("compiled" if on else "loop")
        w = ComputeWeights(self.compute_dtype(device))  # one weight copy shared by the steps

        def ttt_pattern() -> Attend:
            # one layer's: position t at step k sees step 0's keys causally and its own keys of steps 1..k
            k_cache: list[torch.Tensor] = []  # step 0's keys, then each later step's diagonal keys
            v_cache: list[torch.Tensor] = []

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                k_cache.append(k)
                v_cache.append(v)
                return ttt_attention(q, k_cache[0], v_cache[0], k_cache[1:], v_cache[1:], key_valid, scale,
                                     causal=causal, merge=merge)

            return attend

        attends = [ttt_pattern() for _ in range(self.num_layers)]

        # Explicit dtypes inside (autocast would cast every weight again in every TTT step); the
        # autocast-off region never spans a yield, so the caller's autocast state is untouched.
        no_autocast = functools.partial(torch.autocast, device.type, enabled=False)
        with no_autocast():
            hidden = F.linear(self.fc_input(aux_hidden).to(w.dtype), w(self.fc.weight))  # g = fc(a)
        for k in range(ttt_length):
            with no_autocast():
                normed, hidden = self.step(_shift_left(input_ids, k + 1), hidden, base_pos + k, attends, w, on,
                                           self.activation_checkpointing)
            yield normed

    # ------------------------------------------------------------------------------ inference
    def forward_cached(
        self,
        input_ids: torch.Tensor,  # int64 [B, S]: the token each new entry reads
        hidden: torch.Tensor,  # [B, S, H]: fuse(aux) or a previous step's next hidden
        positions: torch.Tensor,  # int64 [B, S] or [S]: rope positions
        cache: DraftCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append S entries to ``cache``; each attends to every earlier entry and itself.

        Returns (normed [B, S, H] for ``logits``, the next step's hidden [B, S, H])."""
        past = len(cache)

        def cached_pattern(layer: int, attn: Attention) -> Attend:
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                keys, vals = cache.append(k, v, layer)
                S, L = q.shape[2], keys.shape[2]
                # entry i (global index past+i) sees cache entries 0..past+i
                visible = (torch.arange(L, device=q.device)[None, :]
                           <= (past + torch.arange(S, device=q.device))[:, None])
                return F.scaled_dot_product_attention(q, keys, vals, attn_mask=visible, scale=attn.scale,
                                                      enable_gqa=attn.n_heads != attn.n_kv)

            return attend

        attends = [cached_pattern(i, a) for i, a in enumerate(self.attention_modules())]
        return self.step(input_ids, hidden, positions, attends)

    # ------------------------------------------------------------------------------ export
    @property
    def export_keys(self) -> tuple[str, ...]:
        """The exported parameters, by their names in this module."""
        later = tuple(f"layers.{i}.{key}" for i in self.layers for key in LATER_LAYER_KEYS)
        extra = tuple(f"fc_norm.{i}.weight" for i in range(len(self.fc_norm))) if self.fc_norm is not None else ()
        return EXPORT_KEYS + later + extra

    def export_name(self, key: str) -> str:
        """A parameter's name in the export: one layer keeps the ``midlayer.`` every engine reads
        (SGLang only that); N layers are ``layers.0..N-1`` throughout, vLLM's own names (vLLM
        renames ``midlayer.`` to ``layers.0.`` itself, so both load there)."""
        if self.num_layers > 1 and key.startswith("midlayer."):
            return "layers.0." + key[len("midlayer."):]
        return key

    def export_config(self) -> dict[str, Any]:
        # aux ids for both engines, each in its own numbering (config.aux_layer_keys)
        return self.config.export_dict(self.aux_layer_ids, self.target_num_layers)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.state_dict()
        return {self.export_name(k): sd[k].detach().to("cpu", torch.bfloat16).contiguous() for k in self.export_keys}

    @classmethod
    def from_export(cls, directory: str | Path, embed_weight: Optional[torch.Tensor] = None,
                    dtype: torch.dtype = torch.float32) -> LlamaEagle3Draft:
        """Load an exported draft (config.json + model.safetensors) for evaluation."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path}: not found (expected an exported llama-eagle3 draft)")
        raw = json.loads(cfg_path.read_text())
        model = cls(DraftConfig.from_export(raw, source=str(cfg_path)))
        model.load_export_weights(directory, load_file)
        if embed_weight is not None:
            model.load_embedding(embed_weight)
        return model.to(dtype)

    def load_export_weights(self, directory: str | Path, load_file=None) -> None:
        """Copy export-keyed weights (and d2t if present) from ``directory/model.safetensors``."""
        if load_file is None:
            from safetensors.torch import load_file
        path = Path(directory) / "model.safetensors"
        tensors = load_file(str(path))
        names = {key: self.export_name(key) for key in self.export_keys}
        missing = [name for name in names.values() if name not in tensors]
        if missing:
            raise KeyError(f"{path}: missing tensors {missing}")
        own = self.state_dict()
        for key, name in names.items():
            if tuple(tensors[name].shape) != tuple(own[key].shape):
                raise ValueError(f"{path}: '{name}' has shape {tuple(tensors[name].shape)}, the draft "
                                 f"config needs {tuple(own[key].shape)}")
        self.load_state_dict({key: tensors[name] for key, name in names.items()}, strict=False)
        if "d2t" in tensors:
            self.d2t = tensors["d2t"]
        if "embed_tokens.weight" in tensors:
            self.load_embedding(tensors["embed_tokens.weight"])


def _shift_left(ids: torch.Tensor, n: int, pad: int = 0) -> torch.Tensor:
    """ids[:, t] -> ids[:, t+n]; the last n positions get ``pad`` (they carry no loss)."""
    out = torch.full_like(ids, pad)
    if n < ids.shape[1]:
        out[:, : ids.shape[1] - n] = ids[:, n:]
    return out
