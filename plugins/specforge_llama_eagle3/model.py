"""LlamaEagle3Draft: the EAGLE-3 draft (fc + one decoder layer + norm + lm_head), its training-time
test unroll, cached incremental inference, and the serving-engine export.

Attribute names equal the export keys (``fc.weight``, ``midlayer.self_attn.q_proj.weight``...), so
``state_dict()`` is the export plus ``embed_tokens.weight``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from specforge_llama_eagle3 import fused
from specforge_llama_eagle3.attention import CAUSAL_IMPLS, ttt_attention
from specforge_llama_eagle3.config import DraftConfig
from specforge_llama_eagle3.rope import apply_rope, cos_sin, inverse_frequencies

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, cast: Optional[fused.Cast] = None, compiled: bool = False) -> torch.Tensor:
        # Normalise in fp32 like Llama, then scale in the input dtype (an fp32 master weight under
        # autocast must not promote the output to fp32).
        w = self.weight if cast is None else cast(self.weight)
        return fused.get("rms_norm", compiled)(x, w, self.eps)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Projections only; the attention pattern is chosen by the caller (TTT or cached).

    ``qkv``/``out`` (and the layer's ``attn_input``/``finish``) are the plain-module reference
    that benchmarks/eager_reference.py reads; the draft itself runs ``Eagle3DecoderLayer.forward``."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        in_dim = 2 * cfg.hidden_size  # cat(normed embedding, normed hidden)
        self.q_proj = nn.Linear(in_dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.scale = self.head_dim ** -0.5

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, 2H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D] with rope applied to q and k."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(B, T, -1))


# attend(q [B, Hq, S, D], k, v [B, Hkv, S, D]) -> [B, Hq, S, D]: the caller's attention pattern
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Eagle3DecoderLayer(nn.Module):
    """The single decoder layer (``midlayer``): it reads the token embedding and the fused
    hidden state side by side (paper: concat of the two, 2H wide), so q/k/v take 2H inputs."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.eps = cfg.rms_norm_eps

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Attend, cast: fused.Cast, compiled: bool = False,
                checkpoint_finish: bool = False) -> torch.Tensor:
        """One step: x = [input_layernorm(emb); hidden_norm(hidden)] -> q,k,v (+rope) -> attend ->
        h = hidden + o_proj(.) -> h + MLP(post_attention_layernorm(h)). Returns the un-normed
        output (the next step's ``hidden``). ``cast`` gives weights in the compute dtype; the fused
        blocks run plain or torch.compiled (``compiled``)."""
        a, mlp = self.self_attn, self.mlp
        x = fused.get("attn_input", compiled)(emb, hidden, cast(self.input_layernorm.weight),
                                              cast(self.hidden_norm.weight), self.eps)
        q, k, v = fused.get("qkv", compiled)(x, cast(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                                             cos, sin, a.n_heads, a.n_kv, a.head_dim)
        out = attend(q, k, v)
        args = (hidden, out, cast(a.o_proj.weight), cast(self.post_attention_layernorm.weight), self.eps,
                cast(mlp.gate_proj.weight), cast(mlp.up_proj.weight), cast(mlp.down_proj.weight))
        f_finish = fused.get("finish", compiled)
        return checkpoint(f_finish, *args, use_reentrant=False) if checkpoint_finish else f_finish(*args)

    def attn_input(self, emb: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(hidden)], dim=-1)

    def finish(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual from the *un-normed* hidden state, then the MLP block; returns un-normed output."""
        h = hidden + self.self_attn.out(attn)
        return h + self.mlp(self.post_attention_layernorm(h))


Eagle3Layer = Eagle3DecoderLayer  # the earlier name


class DraftCache:
    """Per-sequence K/V of the draft's one layer, in append order (rope already applied).

    Every row of the batch holds the same number of entries; ``crop`` rolls back rejected drafts."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None  # [B, Hkv, L, D]
        self.v: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def crop(self, length: int) -> None:
        if length < 0 or length > len(self):
            raise ValueError(f"crop({length}): the cache holds {len(self)} entries")
        if self.k is not None:
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]


class LlamaEagle3Draft(nn.Module):
    def __init__(
        self,
        cfg: DraftConfig,
        aux_layer_ids: Optional[Sequence[int]] = None,  # HF hidden_states indices the target captures
        target_num_layers: Optional[int] = None,
        aux_ids_convention: str = "sglang",
        attention: str = "auto",  # TTT causal part: "eager" (explicit), "sdpa", "flex", "auto"
        compile: str = "auto",  # torch.compile the step's dense parts: "auto" (on CUDA), "on", "off"
    ):
        super().__init__()
        if attention not in ("auto", *CAUSAL_IMPLS):
            raise ValueError(f"attention '{attention}' is not known; allowed: auto, {', '.join(CAUSAL_IMPLS)}")
        if compile not in ("auto", "on", "off"):
            raise ValueError(f"compile '{compile}' is not known; allowed: auto, on, off")
        self.attention = attention
        self.compile = compile
        self.checkpoint_finish = False  # recompute the finish block in backward (memory.py)
        # TTT diagonal merge: "auto" = compiled stacked merge when compiling, else the eager loop
        self.merge = "auto"
        self.config = cfg
        self.aux_layer_ids = list(aux_layer_ids) if aux_layer_ids is not None else None
        self.target_num_layers = target_num_layers
        self.aux_ids_convention = aux_ids_convention
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)  # the target's, frozen
        self.fc = nn.Linear(cfg.num_aux * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        # EAGLE-3.1 (fc_norm): each aux hidden state RMS-normed on its own before fc
        self.fc_norm = (nn.ModuleList(RMSNorm(cfg.target_hidden_size, cfg.rms_norm_eps) for _ in range(cfg.num_aux))
                        if cfg.fc_norm else None)
        self.midlayer = Eagle3DecoderLayer(cfg)
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

    # ------------------------------------------------------------------------------ pieces
    def load_embedding(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            raise ValueError(f"target embedding has shape {tuple(weight.shape)}; the draft expects "
                             f"{tuple(self.embed_tokens.weight.shape)} (vocab_size x hidden_size)")
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight)

    def fuse(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """[..., n_aux*H_t] target features -> [..., H] draft hidden state."""
        return self.fc(self.fc_input(aux_hidden))

    def fc_input(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """The features as fc reads them: as captured, or (EAGLE-3.1) each aux layer normed."""
        if self.fc_norm is None:
            return aux_hidden
        chunks = aux_hidden.chunk(len(self.fc_norm), dim=-1)
        return torch.cat([norm(x) for norm, x in zip(self.fc_norm, chunks, strict=True)], dim=-1)

    @property
    def export_keys(self) -> tuple[str, ...]:
        extra = tuple(f"fc_norm.{i}.weight" for i in range(len(self.fc_norm))) if self.fc_norm is not None else ()
        return EXPORT_KEYS + extra

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits from a normed hidden state."""
        return self.lm_head(normed)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return cos_sin(self.inv_freq, positions, dtype)

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

        Step k at position t reads token x_{t+k+1} with hidden = step k-1's un-normed output at t
        (step 0: fc(aux_t)), at rope position t+k; see docs/draft-model.md. In packed rows ``t`` is
        the position inside the document and attention stays inside it (a document's last
        positions read the next document's first tokens, but their outputs carry no loss and
        only they themselves attend to them: the diagonal keys)."""
        T = input_ids.shape[1]
        device = input_ids.device
        attn = self.midlayer.self_attn
        key_valid = attention_mask.bool() if doc_ids is None else doc_ids
        base_pos = torch.arange(T, device=device) if position_ids is None else position_ids
        causal = self._causal_impl(device)
        on = self._compiled(device)
        merge = self.merge if self.merge != "auto" else ("compiled" if on else "loop")
        cast = fused.Cast(self.compute_dtype(device))  # one weight copy shared by the steps
        k_cache: list[torch.Tensor] = []  # step 0's keys, then each later step's diagonal keys
        v_cache: list[torch.Tensor] = []

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # position t at step k sees step 0's keys causally and its own keys of steps 1..k
            k_cache.append(k)
            v_cache.append(v)
            return ttt_attention(q, k_cache[0], v_cache[0], k_cache[1:], v_cache[1:], key_valid, attn.scale,
                                 causal=causal, merge=merge)

        # Explicit dtypes inside (autocast would cast every weight again in every TTT step); the
        # autocast-off region never spans a yield, so the caller's autocast state is untouched.
        no_autocast = functools.partial(torch.autocast, device.type, enabled=False)
        with no_autocast():
            hidden = F.linear(self.fc_input(aux_hidden).to(cast.dtype), cast(self.fc.weight))  # g = fc(a)
        for k in range(ttt_length):
            with no_autocast():
                emb = self.embed_tokens(_shift_left(input_ids, k + 1))
                cos, sin = self._rope(base_pos + k, cast.dtype)
                hidden = self.midlayer(emb, hidden, cos, sin, attend, cast, compiled=on,
                                       checkpoint_finish=self.checkpoint_finish)
                normed = self.norm(hidden, cast, compiled=on)
            yield normed

    # ------------------------------------------------------------------------------ inference
    def forward_cached(
        self,
        input_ids: torch.Tensor,  # int64 [B, S]: the token each new entry reads
        hidden: torch.Tensor,  # [B, S, H]: fuse(aux) or a previous out_hidden
        positions: torch.Tensor,  # int64 [B, S] or [S]: rope positions
        cache: DraftCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append S entries to ``cache``; each attends to every earlier entry and itself.

        Returns (normed [B, S, H] for ``logits``, out_hidden [B, S, H] to feed the next step)."""
        attn = self.midlayer.self_attn
        past = len(cache)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, vals = cache.append(k, v)
            S, L = q.shape[2], keys.shape[2]
            # entry i (global index past+i) sees cache entries 0..past+i
            visible = torch.arange(L, device=q.device)[None, :] <= (past + torch.arange(S, device=q.device))[:, None]
            return F.scaled_dot_product_attention(q, keys, vals, attn_mask=visible, scale=attn.scale,
                                                  enable_gqa=attn.n_heads != attn.n_kv)

        cast = fused.Cast(hidden.dtype)
        cos, sin = self._rope(positions, hidden.dtype)
        out_hidden = self.midlayer(self.embed_tokens(input_ids), hidden, cos, sin, attend, cast)
        return self.norm(out_hidden, cast), out_hidden

    # ------------------------------------------------------------------------------ export
    def export_config(self) -> dict[str, Any]:
        # aux ids for both engines, each in its own numbering (config.aux_layer_keys)
        return self.config.export_dict(self.aux_layer_ids, self.target_num_layers)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.state_dict()
        return {k: sd[k].detach().to("cpu", torch.bfloat16).contiguous() for k in self.export_keys}

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
        missing = [k for k in self.export_keys if k not in tensors]
        if missing:
            raise KeyError(f"{path}: missing tensors {missing}")
        own = self.state_dict()
        for key in self.export_keys:
            if tuple(tensors[key].shape) != tuple(own[key].shape):
                raise ValueError(f"{path}: '{key}' has shape {tuple(tensors[key].shape)}, the draft "
                                 f"config needs {tuple(own[key].shape)}")
        self.load_state_dict({k: tensors[k] for k in self.export_keys}, strict=False)
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
