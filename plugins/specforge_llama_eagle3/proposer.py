"""The EAGLE-3 chain proposer for ``specforge eval`` (``specforge_core.components.Proposer``).

SGLang ``topk = 1`` / vLLM ``method = "eagle3"``: K greedy draft tokens per cycle, chained through
the draft's own KV cache, batched over rows (prompts).

Draft cache (per layer, the same entries in each): entry p of a row reads x[p+1] with hidden fc(f[p]) at rope position p, so
after ``observe`` the row's last entry (p = n-1) predicts x[n+1]. ``propose(K)`` appends K-1 chain
entries (each reads the previous draft with the previous step's un-normed output as hidden); the
next ``observe`` turns them into holes and appends the real entries of the committed positions.
Rows share one [B, Hkv, L, D] cache per layer; ``valid`` [B, L] marks each row's live entries (padding and
dropped chain entries are holes no query attends to), the same scheme as the target's
``TargetBatch``.

Trees (``propose_tree``, SGLang ``topk > 1``): the dynamic tree of SafeAILab/EAGLE's
``topK_genrate``, layer by layer; a layer's entries are appended with ``live`` False (no later
real entry sees them) and attend to the committed entries plus their own ancestors (``see``).
The next ``observe`` drops them like chain entries. Counts equal EAGLE's ``eagenerate`` per cycle
(tests/test_eval_tree.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from specforge_llama_eagle3.config import hf_aux_layer_ids
from specforge_llama_eagle3.model import LlamaEagle3Draft


class Eagle3ChainProposer:
    def __init__(self, draft: LlamaEagle3Draft, device: torch.device, aux_layers: Optional[list[int]] = None):
        self.draft, self.device = draft, torch.device(device)
        self.aux_layers = aux_layers
        vd = draft.config.draft_vocab_size
        d2t = torch.zeros(vd, dtype=torch.int64) if draft.d2t is None else draft.d2t.to(torch.int64)
        self.draft_to_target = (torch.arange(vd) + d2t).to(self.device)
        self.begin([])

    @property
    def fc_inputs(self) -> int:
        return int(self.draft.fc.weight.shape[1])

    # ------------------------------------------------------------------------------ protocol
    def begin(self, prompts: Sequence[Sequence[int]]) -> None:
        B = len(prompts)
        self.k: list[Optional[torch.Tensor]] = [None] * self.draft.num_layers  # per layer [B, Hkv, L, D]
        self.v: list[Optional[torch.Tensor]] = [None] * self.draft.num_layers
        self.valid = torch.zeros(B, 0, dtype=torch.bool, device=self.device)
        self.entries = [0] * B  # real entries per row = next rope position
        self.chain_from = 0  # cache column where the last propose's chain entries start
        self._normed = self._out = None  # [B, 1, H]: outputs of each row's last real entry

    @torch.no_grad()
    def observe(self, tokens: Sequence[Sequence[int]], features: Sequence[torch.Tensor]) -> None:
        if self.valid.shape[1]:  # the chain entries of the last propose are not real: holes
            self.valid[:, self.chain_from:] = False
        B, S = len(tokens), max(len(t) for t in tokens)
        dtype = self.draft.fc.weight.dtype
        ids = torch.zeros(B, S, dtype=torch.int64, device=self.device)
        feats = torch.zeros(B, S, self.fc_inputs, dtype=dtype, device=self.device)
        live = torch.zeros(B, S, dtype=torch.bool, device=self.device)
        pos = torch.zeros(B, S, dtype=torch.int64, device=self.device)
        for b, (t, f) in enumerate(zip(tokens, features, strict=True)):
            c = len(t)
            ids[b, :c] = torch.as_tensor(list(t), dtype=torch.int64, device=self.device)
            feats[b, :c] = f.to(device=self.device, dtype=dtype)
            live[b, :c] = True
            pos[b, :c] = torch.arange(self.entries[b], self.entries[b] + c, device=self.device)
        normed, out = self._forward(ids, self.draft.fuse(feats), pos, live)
        last = torch.tensor([len(t) - 1 for t in tokens], device=self.device)
        rows = torch.arange(B, device=self.device)
        self._normed, self._out = normed[rows, last][:, None], out[rows, last][:, None]
        self.entries = [n + len(t) for n, t in zip(self.entries, tokens, strict=True)]
        self.chain_from = self.valid.shape[1]

    @torch.no_grad()
    def propose(self, k: int) -> list[list[int]]:
        B = len(self.entries)
        self.chain_from = self.valid.shape[1]
        normed, out = self._normed, self._out
        base = torch.tensor(self.entries, dtype=torch.int64, device=self.device)  # = n per row
        live = torch.ones(B, 1, dtype=torch.bool, device=self.device)
        drafts = []
        for j in range(1, k + 1):
            tok = self.draft_to_target[self.draft.logits(normed)[:, -1].argmax(-1)]  # [B]
            drafts.append(tok)
            if j == k:
                break
            # chain entry j reads draft j at position n-1+j with the previous step's output
            normed, out = self._forward(tok[:, None], out, (base - 1 + j)[:, None], live)
        return torch.stack(drafts, dim=1).tolist()

    def serving_flags(self, draft: str, steps: int, tree: Any) -> dict:
        return serving_flags(draft, steps, tree, self.draft.num_layers)

    def keep(self, rows: Sequence[int]) -> None:
        idx = torch.as_tensor(list(rows), dtype=torch.int64, device=self.device)
        self.k = [None if k is None else k.index_select(0, idx) for k in self.k]
        self.v = [None if v is None else v.index_select(0, idx) for v in self.v]
        self.valid = self.valid.index_select(0, idx)
        self._normed, self._out = self._normed.index_select(0, idx), self._out.index_select(0, idx)
        self.entries = [self.entries[r] for r in rows]

    @torch.no_grad()
    def teacher_forced(self, tokens: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
        """[k, T] target ids: row j, column t = the chain's draft j+1 from position t (one TTT
        pass: step j reads the true token where the chain reads its own draft; they differ only
        after a rejected draft, which no longer changes the accepted prefix)."""
        ids = tokens.to(self.device)[None]
        mask = torch.ones_like(ids, dtype=torch.bool)
        feats = features.to(self.device, self.draft.fc.weight.dtype)[None]
        rows = [self.draft_to_target[self.draft.logits(h)[0].argmax(-1)]
                for h in self.draft.ttt_forward(ids, feats, mask, k)]
        return torch.stack(rows)

    # ------------------------------------------------------------------------------ one forward
    def _forward(self, ids: torch.Tensor, hidden: torch.Tensor, pos: torch.Tensor, live: torch.Tensor,
                 see: Optional[torch.Tensor] = None, inner: Optional[torch.Tensor] = None):
        """Append S entries per row (``live`` False = padding, or tree nodes no later entry sees);
        each new entry attends to its row's valid entries (plus the cached columns ``see`` [B, S, L0]
        marks: a tree node's ancestors), the new ones up to itself (or ``inner`` [B, S, S]), and
        itself. Returns (normed, out_hidden) [B, S, H]."""
        d = self.draft
        B, S = ids.shape
        L0 = self.valid.shape[1]
        # one mask for every layer: each layer's cache holds the same entries
        base = self.valid[:, None, :].expand(B, S, L0)
        if see is not None:
            base = base | see
        new = inner if inner is not None else (torch.ones(S, S, dtype=torch.bool, device=self.device).tril()[None]
                                               & live[:, None, :])
        mask = torch.cat([base, new], dim=2)
        mask[:, torch.arange(S), L0 + torch.arange(S)] = True
        self.valid = torch.cat([self.valid, live], dim=1)

        def pattern(layer: int, attn: Any):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                old_k, old_v = self.k[layer], self.v[layer]
                self.k[layer] = k if old_k is None else torch.cat([old_k, k], dim=2)
                self.v[layer] = v if old_v is None else torch.cat([old_v, v], dim=2)
                return F.scaled_dot_product_attention(q, self.k[layer], self.v[layer], attn_mask=mask[:, None],
                                                      scale=attn.scale, enable_gqa=attn.n_heads != attn.n_kv)

            return attend

        attends = [pattern(i, a) for i, a in enumerate(d.attention_modules())]
        return d.step(ids, hidden, pos, attends)  # (normed, the next step's hidden: EAGLE-3.1 norm_output)

    # ------------------------------------------------------------------------------ trees
    @torch.no_grad()
    def propose_tree(self, topk: int, depth: int, tokens: int) -> list[tuple[list[int], list[int]]]:
        """The dynamic draft tree of EAGLE-2/3 (SafeAILab/EAGLE ``Model.topK_genrate``, SGLang
        ``topk > 1``), per row: the ``topk`` best tokens of the last real entry are layer 1; each
        further layer expands the ``topk`` nodes of the layer above with their ``topk`` best tokens
        each and keeps the ``topk`` best of those ``topk**2`` by cumulative draft log-probability;
        ``depth`` layers (``depth - 1`` cached forwards). Of all scored candidates the
        ``tokens - 1`` best form the tree, in candidate order (layer by layer). Returns per row
        ``(tokens, parents)``: node i+1's target token and its parent node (0 = the root x[n])."""
        B, k = len(self.entries), topk
        self.chain_from = self.valid.shape[1]
        base = torch.tensor(self.entries, dtype=torch.int64, device=self.device)  # = n per row
        rows = torch.arange(B, device=self.device)[:, None]
        logp = torch.log_softmax(self.draft.logits(self._normed)[:, -1].float(), dim=-1)  # [B, Vd]
        top = torch.topk(logp, k, dim=-1)
        scores = top.values  # [B, k]: cumulative log-prob of the current layer's nodes
        layer_tok = self.draft_to_target[top.indices]  # [B, k]
        hidden = self._out.expand(B, k, -1)  # every layer-1 node reads the last real entry's output
        all_scores, all_tokens, all_parents = [scores], [layer_tok], [torch.full((B, k), -1, device=self.device)]
        sel_global = torch.arange(k, device=self.device).expand(B, k)  # candidate index of each node
        offset = k
        see = torch.zeros(B, k, self.valid.shape[1], dtype=torch.bool, device=self.device)
        live = torch.zeros(B, k, dtype=torch.bool, device=self.device)
        eye = torch.eye(k, dtype=torch.bool, device=self.device)[None].expand(B, k, k)
        for level in range(1, depth):
            L0 = self.valid.shape[1]
            pos = (base - 1 + level)[:, None].expand(B, k)
            normed, out = self._forward(layer_tok, hidden, pos, live, see=see, inner=eye)
            # columns each expanded node's children see: its ancestors and its own new entry
            own = torch.cat([see, eye], dim=2)
            step = torch.log_softmax(self.draft.logits(normed).float(), dim=-1)  # [B, k, Vd]
            top = torch.topk(step, k, dim=-1)
            cu = (top.values + scores[:, :, None]).reshape(B, k * k)
            best = torch.topk(cu, k, dim=-1)
            parent = best.indices // k  # [B, k] node of the layer above
            all_scores.append(cu)
            all_tokens.append(self.draft_to_target[top.indices].reshape(B, k * k))
            all_parents.append(sel_global[:, :, None].expand(B, k, k).reshape(B, k * k))
            scores = best.values
            layer_tok = all_tokens[-1][rows, best.indices]
            hidden = out[rows, parent]
            see = own[rows, parent]
            sel_global = offset + best.indices
            offset += k * k
            assert see.shape[2] == L0 + k
        cand_scores = torch.cat(all_scores, dim=1)
        cand_tokens = torch.cat(all_tokens, dim=1).tolist()
        cand_parents = torch.cat(all_parents, dim=1).tolist()
        chosen = torch.topk(cand_scores, tokens - 1, dim=-1).indices.sort(dim=-1).values.tolist()
        trees = []
        for b in range(B):
            node_of = {c: i + 1 for i, c in enumerate(chosen[b])}
            parents = []
            for c in chosen[b]:
                p = cand_parents[b][c]
                if p != -1 and p not in node_of:
                    raise RuntimeError(f"draft tree: candidate {c} was chosen without its parent {p} (a score tie)")
                parents.append(0 if p == -1 else node_of[p])
            trees.append(([cand_tokens[b][c] for c in chosen[b]], parents))
        return trees


def serving_flags(draft: str, steps: int, tree: Any, num_layers: int = 1) -> dict:
    """The engines' flags for this setting (``tree``: a TreeSpec with topk, depth, tokens, or None);
    None where the engine cannot serve it (SGLang's EAGLE-3 draft has one decoder layer)."""
    if tree is None:
        topk, depth, tokens = 1, steps, steps + 1
    else:
        topk, depth, tokens = tree.topk, tree.depth, tree.tokens
    sglang = (f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {draft} --speculative-num-steps {depth} "
              f"--speculative-eagle-topk {topk} --speculative-num-draft-tokens {tokens}")
    vllm = (None if tree is not None else  # vLLM drafts EAGLE-3 chains (no dynamic tree)
            f"--speculative-config '{{\"method\": \"eagle3\", \"model\": \"{draft}\", \"num_speculative_tokens\": {steps}}}'")
    return {"sglang": sglang if num_layers == 1 else None, "vllm": vllm}


def make_proposer(export_dir: str | Path, target: Any, device: Any) -> Eagle3ChainProposer:
    """The proposer of an exported llama-eagle3 draft; ``target`` is a
    ``specforge_core.components.EvalTarget`` (the draft shares its token embedding)."""
    cfg = json.loads((Path(export_dir) / "config.json").read_text())
    draft = LlamaEagle3Draft.from_export(export_dir, embed_weight=target.embedding().detach().float().cpu(),
                                         dtype=target.dtype).to(device).eval()
    aux = hf_aux_layer_ids(cfg)
    width = (len(aux) if aux else 3) * int(target.hf_config["hidden_size"])
    if draft.fc.weight.shape[1] != width:
        raise ValueError(f"{export_dir}: the draft's fc takes {draft.fc.weight.shape[1]} features but "
                         f"{len(aux) if aux else 3} aux layers of this target give {width}")
    return Eagle3ChainProposer(draft, device, aux)
