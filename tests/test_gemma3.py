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
