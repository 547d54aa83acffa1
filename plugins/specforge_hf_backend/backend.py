"""The ``hf`` target backend: a transformers causal LM run in-process, features captured by hooks.

One forward of the *base* model per batch (no ``output_hidden_states``, which would keep all L+1
states, and no full ``[B, T, V]`` logits): forward hooks on the decoder layers just below the aux
layers catch ``hidden_states[i]`` (the output of layer ``i - 1``), ``last_hidden_state`` is the
final post-norm state, and the lm_head runs over the real tokens in chunks for the argmax.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch import nn

from specforge_core.plugin_api import resolve_dtype, target_info_for
from specforge_core.types import Sample, TargetFeatures


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def find_decoder_layers(base_model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The list of decoder layers of an HF base model (``.layers`` for llama-like families)."""
    layers = getattr(base_model, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == num_layers:
        return layers
    for module in base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise RuntimeError(
        f"could not find the {num_layers} decoder layers in {type(base_model).__name__}; "
        "the hf backend supports decoder-only transformers whose layers form one nn.ModuleList"
    )


@contextlib.contextmanager
def capture_hidden_states(layers: nn.ModuleList, ids: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Yield a dict filled during the forward with ``hidden_states[i]`` for each ``i`` in ``ids``.

    ``hidden_states[i]`` is the output of decoder layer ``i - 1`` (HF convention: index 0 is the
    embedding), so the hook sits on layer ``i - 1``; ids must be 1..L-1.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(i: int):
        def hook(_module, _args, output):
            # Decoder layers return a tensor in transformers 5, a tuple (hidden, ...) in older ones.
            captured[i] = output[0] if isinstance(output, tuple) else output

        return hook

    try:
        for i in ids:
            if not 1 <= i <= len(layers) - 1:
                raise ValueError(f"aux layer id {i} out of range 1..{len(layers) - 1}")
            handles.append(layers[i - 1].register_forward_hook(hook_for(i)))
        yield captured
    finally:
        for h in handles:
            h.remove()


def chunked_argmax(hidden: torch.Tensor, head: nn.Module, chunk: int) -> torch.Tensor:
    """Argmax of ``head(hidden)`` over the vocab, ``chunk`` rows at a time: int64 [N]."""
    out = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        out[s : s + chunk] = head(hidden[s : s + chunk]).argmax(dim=-1)
    return out


def resolve_output_device(option: str, config) -> str:
    """'auto' keeps features on the target's device only when producer and trainer share one
    process (local pipeline + in-process store); anything crossing processes goes to host memory."""
    if option != "auto":
        return option
    local = config.run.pipeline == "local" and config.transfer.store == "local"
    return "same" if local else "cpu"


class HFTargetBackend:
    """``TargetBackend`` over ``AutoModelForCausalLM`` (see docs/target-backends.md)."""

    def __init__(self, options, config, device: Optional[str] = None):
        from transformers import AutoModelForCausalLM

        self.options = options
        self.device = resolve_device(device or options.device)
        self.dtype = resolve_dtype(config.inference.dtype, self.device, "inference.dtype")
        self.batch_size = config.inference.batch_size
        m = config.model
        self.info = target_info_for(config)
        self.max_positions = self.info.hf_config.get("max_position_embeddings")

        model = AutoModelForCausalLM.from_pretrained(
            m.target,
            dtype=self.dtype,
            attn_implementation=options.attn_implementation,
            trust_remote_code=m.trust_remote_code,
        )
        model.to(self.device).eval().requires_grad_(False)
        self.model = model
        self.base = model.get_decoder()  # the base model: embeddings, layers, final norm
        self.layers = find_decoder_layers(self.base, self.info.num_hidden_layers)
        self.lm_head = model.get_output_embeddings()
        self.pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
        self.on_host = resolve_output_device(getattr(options, "output_device", "cpu"), config) == "cpu"

    # ------------------------------------------------------------------------------- generate
    def generate(self, samples: Sequence[Sample]) -> list[TargetFeatures]:
        out: list[TargetFeatures] = []
        for s in range(0, len(samples), self.batch_size):
            out.extend(self._generate_batch(samples[s : s + self.batch_size]))
        return out

    def _check(self, sample: Sample) -> None:
        ids, mask = sample.input_ids, sample.loss_mask
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"sample {sample.sample_id!r}: input_ids must be a non-empty 1-D tensor, got {tuple(ids.shape)}")
        if mask.shape != ids.shape:
            raise ValueError(
                f"sample {sample.sample_id!r}: loss_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}"
            )
        if self.max_positions is not None and ids.numel() > self.max_positions:
            raise ValueError(
                f"sample {sample.sample_id!r} has {ids.numel()} tokens but the target {self.info.model_path!r} "
                f"supports at most max_position_embeddings = {self.max_positions}; lower dataset.max_seq_length"
            )
        hi = int(ids.max())
        if int(ids.min()) < 0 or hi >= self.info.vocab_size:
            raise ValueError(
                f"sample {sample.sample_id!r}: token ids must lie in [0, {self.info.vocab_size}) "
                f"(the target's vocab_size); got max {hi} (tokenized with another tokenizer?)"
            )

    @torch.no_grad()  # not inference_mode: its tensors cannot be saved for backward by a trainer
    def _generate_batch(self, samples: Sequence[Sample]) -> list[TargetFeatures]:
        for s in samples:
            self._check(s)
        lengths = [s.num_tokens for s in samples]
        B, T = len(samples), max(lengths)
        # Right padding: real tokens keep positions 0..len-1, so no position_ids are needed.
        ids = torch.full((B, T), self.pad_id, dtype=torch.int64)
        for b, s in enumerate(samples):
            ids[b, : lengths[b]] = s.input_ids
        attn = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        ids, attn_dev = ids.to(self.device), attn.to(self.device)

        aux_ids = self.info.aux_layer_ids
        with capture_hidden_states(self.layers, aux_ids) as captured:
            out = self.base(input_ids=ids, attention_mask=attn_dev.long(), use_cache=False)
        final = out[0].to(self.dtype)  # last_hidden_state: after the final norm [B, T, H]
        aux = torch.cat([captured[i] for i in aux_ids], dim=-1).to(self.dtype)  # [B, T, n*H], low -> high
        # Full-vocab argmax over the real tokens only, in chunks (never [B*T, V] logits at once).
        argmax = chunked_argmax(final[attn_dev], self.lm_head, self.options.argmax_chunk_size)
        on_host = self.on_host
        argmax_c = (argmax.cpu() if on_host else argmax).split(lengths)

        # Each feature owns exactly its storage (a view of a batch tensor would drag the whole batch
        # along when pickled into a transfer store). Host copies go to pinned buffers without a sync
        # each (pageable copies serialised the batch: +89% over the forward); one sync at the end.
        def own(x: torch.Tensor) -> torch.Tensor:
            if not on_host:
                return x.clone()
            if x.device.type == "cpu":
                return x.clone()
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            return buf.copy_(x, non_blocking=True)

        feats = []
        for b, s in enumerate(samples):
            n = lengths[b]
            feats.append(
                TargetFeatures(
                    sample_id=s.sample_id,
                    input_ids=s.input_ids.to(torch.int64).clone(),
                    loss_mask=s.loss_mask.to(torch.uint8).clone(),
                    aux_hidden=own(aux[b, :n]),
                    final_hidden=own(final[b, :n]),
                    target_argmax=argmax_c[b].clone(),
                    category=s.category,
                )
            )
        if on_host and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the features are complete on return
        return feats

    # -------------------------------------------------------------------------- generate_text
    def generate_text(self, prompts: Sequence[Sequence[int]], params) -> list:
        """``TargetBackend.generate_text``: replies to token-id prompts with transformers' own
        ``generate`` (KV cache), ``inference.batch_size`` prompts at a time, left-padded; in prompt
        order. With ``inference.hf.generate_cache = "static"`` the prompts are batched by length and
        padded to a bucket so the compiled decode step is reused across batches."""
        from specforge_core.components import GeneratedText

        tok = self._tokenizer()
        eos = [t for t in (self.model.generation_config.eos_token_id, tok.eos_token_id) if t is not None]
        eos = sorted({int(x) for t in eos for x in (t if isinstance(t, (list, tuple)) else [t])})
        stops = sorted(set(eos) | {int(t) for t in params.stop_token_ids})
        static = self.options.generate_cache == "static"
        extra: dict = {}
        order = list(range(len(prompts)))
        if static:
            import torch._dynamo as dynamo  # not `import torch._dynamo`: that makes `torch` a local name

            # one compiled graph per (batch, padded length): more shapes than dynamo's default 8
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            extra["cache_implementation"] = "static"
            order.sort(key=lambda i: len(prompts[i]))
        out: list = [None] * len(prompts)
        for start in range(0, len(prompts), self.batch_size):
            idx = order[start : start + self.batch_size]
            chunk = [list(map(int, prompts[i])) for i in idx]
            width = max(len(p) for p in chunk)
            if static:
                bucket = self.options.generate_bucket
                width = -(-width // bucket) * bucket
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            sample = params.temperature > 0
            if sample and params.seed is not None:
                torch.manual_seed(params.seed + start)  # per batch: a rerun regenerates the same text
            with torch.no_grad():
                gen = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                    max_new_tokens=params.max_new_tokens, do_sample=sample,
                    temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
                    top_k=None, eos_token_id=stops, pad_token_id=self.pad_id, **extra,
                )[:, width:].cpu()
            for i, row in zip(idx, gen.tolist(), strict=True):
                out[i] = _finish(tok, row, stops, params, GeneratedText)
        return out

    def _tokenizer(self):
        if getattr(self, "_tok", None) is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.info.model_path)
        return self._tok

    def close(self) -> None:
        self.model = self.base = self.layers = self.lm_head = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _finish(tok, row: list[int], stops: list[int], params, result_type):
    """One ``GeneratedText`` from a generated row: cut after the first stop token (generate pads
    finished rows), then at the first stop string (the text before it; the tokens that produced it)."""
    tokens, reason = [], "length"
    for t in row:
        tokens.append(t)
        if t in stops:
            reason = "stop"
            break
    text = tok.decode(tokens, skip_special_tokens=True)
    hits = sorted((text.find(s), len(s)) for s in params.stop if s and s in text)
    if hits:
        cut, n = hits[0]
        for k in range(1, len(tokens) + 1):  # the shortest token prefix whose text holds the stop
            if len(tok.decode(tokens[:k], skip_special_tokens=True)) >= cut + n:
                tokens = tokens[:k]
                break
        text, reason = text[:cut], "stop"
    return result_type(token_ids=tokens, text=text, finish_reason=reason)
