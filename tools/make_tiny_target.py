#!/usr/bin/env python
"""Make the shipped tiny assets (deterministic; a few minutes on 2 CPU cores).

Writes into ``configs/assets/``:

- ``data/sample_chat.jsonl``: synthetic conversations (arithmetic, counting, spelling, facts about
  made-up creatures, multi-turn; some with system prompts; ShareGPT and OpenAI style lines).
- ``data/eval_prompts.jsonl``: held-out conversations (fresh numbers/words, drawn from a separate
  seed) whose last assistant turn is the reference answer.
- ``tiny-target/``: a byte-level BPE tokenizer with Llama-3 and ChatML special tokens and a Llama-3
  style ``chat_template``, and a small ``LlamaForCausalLM`` trained on the rendered conversations
  so that its next-token distribution is peaked (a useful target for a draft model to imitate).

Run: ``python tools/make_tiny_target.py`` (``--steps``/``--out`` to experiment).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
SPECIAL_TOKENS = [
    "<|pad|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
]
# Meta's Llama-3 template (content trimmed, BOS first), which the "llama3" named template mirrors.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# ---- synthetic conversations -------------------------------------------------------------------

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
WORDS = (
    "apple river garden planet yellow window silver market pencil dragon forest candle bridge "
    "rocket meadow button orange castle winter summer basket ladder pocket shadow thunder "
    "marble velvet harbor lantern jungle kitten puzzle saddle tomato violin wagon"
).split()
CREATURES = {
    # made-up creatures with fixed facts, so the model can learn them
    "zorblat": ("a small blue bird", "the misty hills", "sweet berries"),
    "quillip": ("a tiny green lizard", "the desert caves", "crunchy beetles"),
    "mornak": ("a large gray ox", "the cold plains", "dry grass"),
    "fendra": ("a shy orange fox", "the pine forest", "wild mushrooms"),
    "glimmet": ("a glowing white moth", "the old ruins", "flower nectar"),
    "trubble": ("a round brown beetle", "the river banks", "fallen leaves"),
    "skavvy": ("a quick black rat", "the city sewers", "bread crumbs"),
    "olopop": ("a gentle pink whale", "the warm sea", "little shrimp"),
}
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a friendly tutor who explains things simply.",
]


def q_arith(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(1, 20), r.randint(1, 20)
    kind = r.choice(["plus", "times", "minus"])
    if kind == "minus" and b > a:
        a, b = b, a
    res = {"plus": a + b, "times": a * b, "minus": a - b}[kind]
    sym = {"plus": "+", "times": "*", "minus": "-"}[kind]
    q = r.choice([f"What is {a} {kind} {b}?", f"Compute {a} {sym} {b}.", f"Please calculate {a} {kind} {b}."])
    a_ = r.choice([f"{a} {kind} {b} is {res}.", f"The answer is {res}.", f"{a} {sym} {b} = {res}."])
    return "arithmetic", q, a_


def q_count(r: random.Random) -> tuple[str, str, str]:
    start = r.randint(1, 12)
    end = start + r.randint(3, 7)
    q = r.choice([f"Count from {start} to {end}.", f"Please count from {start} up to {end}."])
    return "counting", q, ", ".join(str(i) for i in range(start, end + 1)) + "."


def q_spell(r: random.Random) -> tuple[str, str, str]:
    w = r.choice(WORDS)
    q = r.choice([f"Spell the word {w}.", f"How do you spell {w}?", f"Spell out {w} letter by letter."])
    return "spelling", q, f"{w} is spelled " + "-".join(w) + "."


def q_fact(r: random.Random) -> tuple[str, str, str]:
    name = r.choice(sorted(CREATURES))
    what, where, food = CREATURES[name]
    kind = r.choice(["what", "where", "food", "all"])
    q = {
        "what": f"What is a {name}?",
        "where": f"Where does the {name} live?",
        "food": f"What does the {name} eat?",
        "all": f"Tell me about the {name}.",
    }[kind]
    a = {
        "what": f"The {name} is {what}.",
        "where": f"The {name} lives in {where}.",
        "food": f"The {name} eats {food}.",
        "all": f"The {name} is {what}. It lives in {where} and eats {food}.",
    }[kind]
    return "facts", q, a


def q_words(r: random.Random) -> tuple[str, str, str]:
    n = r.randint(0, 12)
    return "counting", f"Write the number {n} in words.", f"The number {n} is written {NUMBER_WORDS[n]}."


GENERATORS = [q_arith, q_count, q_spell, q_fact, q_words]


def make_conversation(r: random.Random, idx: int, prefix: str) -> dict:
    n_turns = 1 if r.random() < 0.7 else r.randint(2, 3)
    turns = []
    if r.random() < 0.3:
        turns.append(("system", r.choice(SYSTEM_PROMPTS)))
    cats = []
    for _ in range(n_turns):
        cat, q, a = r.choice(GENERATORS)(r)
        cats.append(cat)
        turns += [("user", q), ("assistant", a)]
    category = "multi-turn" if n_turns > 1 else cats[0]
    rec: dict = {"id": f"{prefix}-{idx:04d}", "category": category}
    if r.random() < 0.3:  # OpenAI style
        rec["messages"] = [{"role": role, "content": text} for role, text in turns]
    else:  # ShareGPT style
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        rec["conversations"] = [{"from": names[role], "value": text} for role, text in turns]
    return rec


# ---- tokenizer and model -----------------------------------------------------------------------


def render_llama3(rec: dict) -> str:
    turns = rec.get("messages") or [
        {"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
        for t in rec["conversations"]
    ]
    out = "<|begin_of_text|>"
    for t in turns:
        out += f"<|start_header_id|>{t['role']}<|end_header_id|>\n\n{t['content'].strip()}<|eot_id|>"
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Extra plain text so the vocab covers general English-ish words beyond the templates.
    extra = [" ".join(WORDS + NUMBER_WORDS + list(CREATURES)), " ".join(str(i) for i in range(1000))]
    tok.train_from_iterator(texts + extra, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|begin_of_text|>", "<|eot_id|>", "<|pad|>")],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def save_tokenizer(tokenizer, model_dir: Path) -> None:
    """Save, then make tokenizer_config.json readable by older transformers (4.x, as SGLang/vLLM
    images ship): the generic fast class, and the chat template inline as well as in its .jinja."""
    tokenizer.save_pretrained(model_dir)
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens", [])
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def make_model(tokenizer, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def patch_config(model_dir: Path) -> None:
    """transformers 5 writes rope settings only under ``rope_parameters``; engines built on 4.x read
    ``rope_theta`` (and default it when missing), so write it explicitly as well."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    cfg.setdefault("rope_scaling", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def batches(seqs: list[list[int]], batch_size: int, pad_id: int, r: random.Random):
    """Endless shuffled batches, right-padded; labels -100 on padding."""
    while True:
        order = list(range(len(seqs)))
        r.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [seqs[j] for j in order[i : i + batch_size]]
            T = max(map(len, chunk))
            ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            att = torch.zeros((len(chunk), T), dtype=torch.long)
            for k, s in enumerate(chunk):
                ids[k, : len(s)] = torch.tensor(s)
                att[k, : len(s)] = 1
            labels = ids.masked_fill(att == 0, -100)
            yield ids, att, labels


@torch.no_grad()
def peakedness(model, seqs: list[list[int]], masks: list[list[int]]) -> tuple[float, float, float]:
    """Mean max-probability of the next-token distribution over all positions and over the
    positions that predict an assistant token; and the held-out loss."""
    model.eval()
    all_p, asst_p, nll, n = [], [], 0.0, 0
    for s, m in zip(seqs, masks, strict=True):
        ids = torch.tensor([s])
        logits = model(input_ids=ids).logits[0, :-1].float()
        probs = logits.softmax(-1)
        maxp = probs.max(-1).values
        tgt = ids[0, 1:]
        nll += float(-probs[torch.arange(len(tgt)), tgt].log().sum())
        n += len(tgt)
        all_p.append(maxp)
        asst_p.append(maxp[torch.tensor(m[1:], dtype=torch.bool)])
    model.train()
    return float(torch.cat(all_p).mean()), float(torch.cat(asst_p).mean()), nll / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "configs" / "assets"))
    ap.add_argument("--num-train", type=int, default=400)
    ap.add_argument("--num-eval", type=int, default=32)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    model_dir = out / "tiny-target"
    model_dir.mkdir(parents=True, exist_ok=True)

    # Train and eval data come from different seeds; eval records never repeat a train record.
    r_train, r_eval = random.Random(args.seed), random.Random(args.seed + 1000)
    train = [make_conversation(r_train, i, "chat") for i in range(args.num_train)]
    seen = {json.dumps(rec.get("messages") or rec["conversations"]) for rec in train}
    evals: list[dict] = []
    while len(evals) < args.num_eval:
        rec = make_conversation(r_eval, len(evals), "eval")
        if json.dumps(rec.get("messages") or rec["conversations"]) not in seen:
            evals.append(rec)
    for name, recs in (("sample_chat.jsonl", train), ("eval_prompts.jsonl", evals)):
        with open(out / "data" / name, "w") as f:
            for rec in recs:
                f.write(json.dumps(rec) + "\n")

    texts = [render_llama3(rec) for rec in train]
    tokenizer = train_tokenizer(texts, args.vocab_size)
    save_tokenizer(tokenizer, model_dir)
    vocab = len(tokenizer)
    vocab_padded = ((vocab + 63) // 64) * 64  # embedding rows may exceed the tokenizer, as in real models
    print(f"tokenizer: {vocab} tokens (embedding rows {vocab_padded})")

    # Token ids and assistant masks with the project's own pipeline (same as the draft trainer sees).
    from specforge_core.data import load_conversations, tokenize_conversation

    def encode(path):
        convs, _ = load_conversations([path])
        pairs = [tokenize_conversation(tokenizer, c, "llama3", 2048)[:2] for c in convs]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    train_ids, _ = encode(out / "data" / "sample_chat.jsonl")
    eval_ids, eval_masks = encode(out / "data" / "eval_prompts.jsonl")
    print(f"train: {len(train_ids)} conversations, {sum(map(len, train_ids))} tokens")

    model = make_model(tokenizer, vocab_padded)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    it = batches(train_ids, args.batch_size, tokenizer.pad_token_id, random.Random(args.seed))
    model.train()
    ema = None
    for step in range(args.steps):
        ids, att, labels = next(it)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lv = loss.item()
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {lv:.4f}  (ema {ema:.4f})  {time.time() - t0:.0f}s")

    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir, safe_serialization=True)
    patch_config(model_dir)
    p_all, p_asst, heldout_loss = peakedness(model.float(), eval_ids, eval_masks)
    report = {
        "final_train_loss_ema": round(ema, 4),
        "heldout_loss": round(heldout_loss, 4),
        "heldout_mean_max_prob_all": round(p_all, 4),
        "heldout_mean_max_prob_assistant": round(p_asst, 4),
        "steps": args.steps,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(report, indent=2))
    (model_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
