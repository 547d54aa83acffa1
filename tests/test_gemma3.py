"""Gemma 3 270M (base), the second real target family: everything where its conventions differ from a
Llama-shaped target, checked against transformers' own forward of the real weights.

The real-model tests load ``reference/gemma3-270m`` (``specforge reference fetch --gemma3``; or
$SPECFORGE_REFERENCE_DIR) and are skipped, saying so, when it is absent. Fast tests read only the
shipped ``configs/targets/gemma3-270m/config.json``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

from specforge_core.config.schema import SpecforgeConfig
from specforge_core.data.formats import DataError
from specforge_core.types import Sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
REF = Path(os.environ.get("SPECFORGE_REFERENCE_DIR", ROOT / "reference"))
GEMMA = REF / "gemma3-270m"
TARGET_CONFIG = ROOT / "configs" / "targets" / "gemma3-270m" / "config.json"

needs_gemma = pytest.mark.skipif(
    not (GEMMA / "model.safetensors").is_file(),
    reason=f"{GEMMA} absent: run `specforge reference fetch --gemma3`",
)

# Google's chat template of the Gemma 3 instruct checkpoints (tokenizer_config.json of
# google/gemma-3-*-it), string contents only: the independent renderer the named template must match.
GOOGLE_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GEMMA))


@functools.lru_cache(maxsize=1)
def reference_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(GEMMA), dtype=torch.float32, attn_implementation="sdpa").eval()


def gemma_config(**model) -> SpecforgeConfig:
    cfg = SpecforgeConfig()
    cfg.model.target = str(GEMMA)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.inference.dtype = "fp32"
    cfg.inference.batch_size = 2
    return cfg


def text_sample(sample_id: str, n: int) -> Sample:
    """``n`` real tokens of English text (a BOS, then a repeated paragraph)."""
    para = ("Speculative decoding drafts a few tokens with a small model and verifies them with the "
            "large one in a single forward pass; accepted tokens are free. ")
    ids = tokenizer()(para * (n // 20 + 2)).input_ids[:n]
    return Sample(sample_id=sample_id, input_ids=torch.tensor(ids), loss_mask=torch.ones(n, dtype=torch.uint8))


# ---------------------------------------------------------------------------- draft configuration
def test_draft_configs_from_the_gemma_config():
    """head_dim 256 (not hidden/heads = 160), the global layers' rope (theta 1e6, not the sliding
    layers' 1e4 and not a silent 10000 default), Gemma's eps; the export writes them explicitly."""
    from specforge_dflash.plugin import DFlashAlgorithm, DFlashOptions
    from specforge_llama_eagle3.config import DraftConfig
    from specforge_peagle.plugin import PEagleAlgorithm

    hf = json.loads(TARGET_CONFIG.read_text())
    assert hf["rope_parameters"]["full_attention"]["rope_theta"] == 1e6 and "rope_theta" not in hf
    c = DraftConfig.from_target(hf, 4096)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (640, 4, 1, 256)
    assert (c.rope_theta, c.rope_scaling, c.rms_norm_eps) == (1e6, None, hf["rms_norm_eps"])
    out = c.export_dict([2, 9, 15], 18)
    assert (out["head_dim"], out["rope_theta"], out["vocab_size"]) == (256, 1e6, 262144)
    assert "eagle_aux_hidden_state_layer_ids" not in out  # [2, 9, 15] is the EAGLE-3 default
    d = DFlashAlgorithm(DFlashOptions()).draft_config(hf, 5, 4096)
    assert (d.head_dim, d.rope_theta, d.mask_token_id) == (256, 1e6, 0)  # <pad> masks the slots
    p = PEagleAlgorithm(None).draft_config(hf, 3, 4096)
    assert (p.head_dim, p.rope_theta) == (256, 1e6)


def test_plan_counts_gemma_parameters():
    """Gemma layers have q/k norms and four RMSNorms; the count equals the safetensors' 268,098,176."""
    from specforge_core.plan import target_params

    assert sum(target_params(json.loads(TARGET_CONFIG.read_text())).values()) == 268_098_176


def test_shipped_target_config_is_the_fetched_one():
    if not (GEMMA / "config.json").is_file():
        pytest.skip(f"{GEMMA} absent")
    assert json.loads(TARGET_CONFIG.read_text()) == json.loads((GEMMA / "config.json").read_text())


# ------------------------------------------------------------------------------------ template
CONV = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "  What is 2+2? \n"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": " 6 \n"},
]


@needs_gemma
@pytest.mark.parametrize("messages", [CONV, CONV[1:]], ids=["system", "no-system"])
def test_gemma_template_equals_googles_and_masks_the_model_turns(messages):
    from specforge_core.data.formats import Conversation, Turn
    from specforge_core.data.templates import get_template, render_segments

    tok = tokenizer()
    conv = Conversation(sample_id="c", turns=[Turn(m["role"], m["content"]) for m in messages])
    segs = render_segments(get_template("gemma"), conv)
    text = "".join(s for s, _ in segs)
    assert text == tok.apply_chat_template(messages, chat_template=GOOGLE_TEMPLATE, tokenize=False)
    gen = render_segments(get_template("gemma"), Conversation(sample_id="g", turns=conv.turns[:-1]), True)
    assert "".join(s for s, _ in gen) == tok.apply_chat_template(
        messages[:-1], chat_template=GOOGLE_TEMPLATE, tokenize=False, add_generation_prompt=True)
    # in the loss: exactly each model reply (trimmed) and its <end_of_turn>
    assert [s for s, m in segs if m] == ["4", "<end_of_turn>", "6", "<end_of_turn>"]


@needs_gemma
def test_gemma_template_ids_and_masks_through_the_data_pipeline(tmp_path):
    from specforge_core.data.build import tokenize_all

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "c", "messages": CONV[1:3]}) + "\n")
    cfg = gemma_config().dataset
    cfg.path, cfg.chat_template = [str(path)], "gemma"
    (sample,), _ = tokenize_all(cfg, tokenizer(), [path])
    ids, mask = sample.input_ids.tolist(), sample.loss_mask.tolist()
    tok = tokenizer()
    # <bos> <start_of_turn> user \n What is 2+2? <end_of_turn> \n <start_of_turn> model \n 4 <end_of_turn> \n
    want = tok.apply_chat_template(CONV[1:3], chat_template=GOOGLE_TEMPLATE, tokenize=False)
    assert ids == tok(want, add_special_tokens=False).input_ids  # one <bos>, the template's
    assert ids[:4] == [2, 105, 2364, 107] and ids.count(2) == 1
    i = len(ids) - 1 - ids[::-1].index(4368)  # the last "model" header
    assert ids[i - 1 : i + 2] == [105, 4368, 107]
    loss = [t for t, m in zip(ids, mask, strict=True) if m]
    assert loss == ids[i + 2 : -1] and loss[-1] == 106 and tok.decode(loss[:-1]) == "4"
    assert ids[-1] == 107 and mask[-1] == 0  # the "\n" after <end_of_turn> is not the model's


@needs_gemma
def test_auto_template_refuses_a_tokenizer_without_one(tmp_path):
    from specforge_core.data.build import tokenize_all

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "c", "messages": CONV[1:3]}) + "\n")
    cfg = gemma_config().dataset
    cfg.path, cfg.chat_template = [str(path)], "auto"
    with pytest.raises(DataError) as e:
        tokenize_all(cfg, tokenizer(), [path])
    msg = str(e.value)
    assert "\n" not in msg and "no chat_template" in msg and "gemma" in msg


# ----------------------------------------------------------------------------------- capture
@pytest.mark.slow
@needs_gemma
def test_capture_equals_transformers_forward_on_sliding_and_global_layers():
    """The hf backend's aux/final states and argmax on the real Gemma equal transformers' own
    ``output_hidden_states`` and logits, batched with right padding, one sample longer than the
    sliding window (512) so the sliding layers' masks matter."""
    from specforge_hf_backend.backend import HFTargetBackend
    from specforge_hf_backend.options import HFBackendOptions

    cfg = gemma_config()
    backend = HFTargetBackend(HFBackendOptions(argmax_chunk_size=128), cfg, device="cpu")
    assert backend.info.aux_layer_ids == [2, 9, 15]  # the EAGLE-3 default for 18 layers
    model = reference_model()
    types = model.config.layer_types
    # aux id i is the residual entering layer i = the output of layer i-1: here all sliding layers;
    # the global layers (5, 11, 17) are checked through the final state and the custom ids below
    assert [types[i - 1] for i in (2, 9, 15)] == ["sliding_attention"] * 3
    samples = [text_sample("long", 600), text_sample("short", 37)]
    feats = backend.generate(samples)
    custom = HFTargetBackend(HFBackendOptions(), gemma_config(aux_layers=[6, 12, 17]), device="cpu")
    feats_custom = custom.generate(samples[1:])
    # Gemma's residual stream runs to hundreds: padding changes the kernels' summation order, so the
    # tolerance is relative (a wrong layer or a missed norm is off by O(1) and more)
    close = functools.partial(torch.testing.assert_close, atol=1e-2, rtol=2e-3)
    for s, f in zip(samples, feats, strict=True):
        with torch.no_grad():
            out = model(s.input_ids[None], output_hidden_states=True)
        hs = [h[0] for h in out.hidden_states]
        assert len(hs) == 19
        close(f.aux_hidden, torch.cat([hs[2], hs[9], hs[15]], -1))
        # final_hidden is what the head reads: lm_head(final) are transformers' logits
        close(model.lm_head(f.final_hidden), out.logits[0])
        close(f.final_hidden, hs[18])
        assert torch.equal(f.target_argmax, out.logits[0].argmax(-1))
    close(feats_custom[0].aux_hidden, torch.cat([hs[6], hs[12], hs[17]], -1))
    backend.close()
    custom.close()


# ---------------------------------------------------------------------------------- embedding
@pytest.mark.slow
@needs_gemma
def test_the_draft_reads_the_raw_embedding_table_as_every_engine_hands_it():
    """Gemma's layers see ``embed_tokens(ids) * sqrt(640)`` (the scale lives in the target's forward:
    HF ``Gemma3TextScaledWordEmbedding``, vLLM ``Gemma3Model.embed_input_ids``). The engines give an
    EAGLE-3 draft the *module's table* (vLLM ``_maybe_share_embeddings`` shares
    ``model.embed_tokens``; SGLang ``get_embed_and_head`` returns its weight), unscaled: training and
    ``specforge eval`` must read the same unscaled table, and do. (DFlash ships the scaled rows as
    its own table instead: tests/test_gemma3_dflash_vllm.py.)"""
    from specforge_core.target import load_target_head_and_embedding

    model = reference_model()
    embed, head = load_target_head_and_embedding(str(GEMMA), row_ids=torch.tensor([5, 106, 262143]),
                                                 dtype=torch.float32)
    raw = model.model.embed_tokens.weight
    assert torch.equal(embed, raw) and torch.equal(head, raw[[5, 106, 262143]])  # tied head
    scale = float(model.model.embed_tokens.embed_scale)
    assert scale == pytest.approx(640 ** 0.5)
    s = text_sample("e", 12)
    with torch.no_grad():
        hs0 = model(s.input_ids[None], output_hidden_states=True).hidden_states[0][0]
    torch.testing.assert_close(hs0, raw[s.input_ids] * scale)  # the target's layers see the scaled rows
    # EAGLE-3 normalises the embedding before its layer (RMSNorm, eps 1e-6): the scale changes its
    # input by this much (measured, not assumed) -- DFlash adds the raw rows to its residual stream.
    e = raw[s.input_ids]

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps)

    rel = ((rms(e) - rms(e * scale)).norm(dim=-1) / rms(e * scale).norm(dim=-1)).max()
    assert rel < 1e-3, float(rel)


# ---------------------------------------------------------------------------------------- head
@pytest.mark.slow
@needs_gemma
def test_full_vocab_argmax_and_log_probs_in_chunks_over_262k_rows():
    """``target_argmax`` and the LK loss's full-vocab log-probs over Gemma's 262,144-row tied head,
    chunked, equal one unchunked pass (the chunk bounds the [tokens x 262144] logits held at once)."""
    from specforge_defaults.loss_lk import target_log_probs
    from specforge_hf_backend.backend import chunked_argmax

    from specforge_core.target import load_target_head_and_embedding

    model = reference_model()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(96, 640, generator=g) * 3
    full_logits = model.lm_head(hidden)
    assert full_logits.shape == (96, 262144)
    assert torch.equal(chunked_argmax(hidden, model.lm_head, 40), full_logits.argmax(-1))
    draft_ids = torch.arange(0, 262144, 64)  # a 4096-token draft vocabulary, in draft order
    _, full = load_target_head_and_embedding(str(GEMMA), dtype=torch.float32)
    _, rows = load_target_head_and_embedding(str(GEMMA), row_ids=draft_ids, dtype=torch.float32)
    got = target_log_probs(hidden, rows, full, chunk=32)
    want = torch.log_softmax(full_logits, -1)[:, draft_ids]
    torch.testing.assert_close(got.logp, want, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@needs_gemma
def test_cpu_recipe_trains_exports_and_evaluates_a_gemma_draft(tmp_path):
    """The clean-clone path on 2 cores: the CPU recipe (shrunk further) trains and exports an
    EAGLE-3 draft, ``specforge export`` writes it again from the checkpoint, and ``specforge eval``
    drafts with it on the real target (greedy, checked equal to the target's own greedy text)."""
    import subprocess
    import sys

    sharegpt = REF / "data" / "sharegpt-256.jsonl"
    mtbench = REF / "data" / "mtbench.jsonl"
    if not (sharegpt.is_file() and mtbench.is_file()):
        pytest.skip("ShareGPT/MT-bench absent: run `specforge reference fetch`")
    out = tmp_path / "run"
    common = ["configs/gemma3-270m-sharegpt-cpu.toml", f"model.target={GEMMA}", f"run.output_dir={out}",
              f'dataset.path=["{sharegpt}"]', f'eval.data=["{mtbench}"]', f"dataset.cache_dir={tmp_path / 'cache'}"]

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "specforge_core.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    stdout = cli("run", *common, "dataset.max_samples=8", "dataset.max_seq_length=192",
                 "model.llama-eagle3.ttt_length=2", "model.draft_vocab_size=1024", "logging.progress=false",
                 "training.log_every=1")
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert steps and all(0 < float(s.split("| loss ")[1].split()[0]) < 1e3 for s in steps), stdout
    cfg = json.loads((out / "export" / "config.json").read_text())
    assert (cfg["head_dim"], cfg["rope_theta"], cfg["vocab_size"], cfg["draft_vocab_size"]) == (256, 1e6, 262144, 1024)
    again = tmp_path / "again"
    cli("export", *common, "--output", str(again))
    assert (again / "model.safetensors").read_bytes() == (out / "export" / "model.safetensors").read_bytes()
    result = tmp_path / "eval.json"
    cli("eval", *common, "--max-prompts", "2", "--max-new-tokens", "12", "--steps", "2", "--json", str(result))
    report = json.loads(result.read_text())
    # exact speculation (not teacher-forced), no errors: each output was checked equal to greedy
    assert (report["engine"], report["mode"], report["errors"], len(report["prompts"])) == ("hf", "exact", [], 2), report
    assert 1.0 <= report["overall"]["tau"] <= 3.0


# ----------------------------------------------------------------------------------- evaluator
@pytest.mark.slow
@needs_gemma
def test_the_evaluators_target_equals_gemma_past_the_sliding_window():
    """``specforge eval``'s batched target (one shared cache, explicit masks, holes) on sequences
    longer than Gemma's 512-token window equals transformers' own forward: its sliding layers get
    their own mask (a single 4D mask reached every layer as is: logits off by ~43 once a sequence
    crossed 512 tokens, and a shape error once the sliding layers' cache dropped old entries)."""
    from specforge_core.evaluation.batch import TargetBatch
    from specforge_core.evaluation.target import TargetModel

    tm = TargetModel(str(GEMMA), [2, 9, 15], "cpu", "fp32")
    assert tm.sliding_window == 512
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(10, 20000, (600,), generator=g).tolist()
    with torch.no_grad():
        full = tm.model(torch.tensor([seq])).logits[0]
    for split in (500, 590):  # a verification that crosses the window; one past it
        batch = TargetBatch(tm)
        batch.prefill([seq[:split], seq[:40]])  # a second, shorter row shares the cache (left padding)
        rest = seq[split:]
        decoy = [7] * 5  # row 1 appends tokens it then rejects: holes in its cache
        logits, _, width = batch.append([rest, decoy], logits=True)
        torch.testing.assert_close(logits[0, : len(rest)], full[split:], atol=1e-3, rtol=1e-4)
        batch.commit([len(rest), 0], width)
    # and greedy decoding, the reference speculation must equal, with the same cache
    out = tm.greedy(seq[:508], 8)  # crosses the window
    ref, cur = [], list(seq[:508])
    for _ in range(8):
        with torch.no_grad():
            ref.append(int(tm.model(torch.tensor([cur])).logits[0, -1].argmax()))
        cur.append(ref[-1])
    assert out == ref
