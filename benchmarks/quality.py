"""Draft quality on the reference target: SmolLM2-135M-Instruct drafts trained on a fixed token budget
of ShareGPT, measured by MT-bench acceptance length at K = 3, 5, 7 (the project's `specforge eval`),
per category, with wall time and GPU-seconds, for several training variants side by side.

Two stages (docs/quality.md):

    # here (CPU): a ShareGPT slice holding the token budget, the prompts to regenerate from, MT-bench
    python benchmarks/quality.py prepare --assets reference --out .carry/quality --budget 1000000

    # on one GPU: convert the target if needed, regenerate data with the target (variants that use
    # it), train every variant at once on the same GPU, evaluate each at K = 3, 5, 7, print a table
    python benchmarks/quality.py run --data .carry/quality --model reference/smollm2-135m-instruct \\
        --out benchmarks/results/quality_h200.json

The budget counts assistant tokens (what the loss is computed on); the regenerated set stops once the
target's own answers hold as many. Variants train concurrently on one GPU (a 135M target leaves an
H200 mostly idle); a variant's GPU-seconds are its share of the GPU while it trained (wall time
divided by the number of trainings running at each moment), plus its share of the regeneration.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))  # regen_speed, also when this module is imported
from specforge_core.reference import jsonl_line  # noqa: E402

RECIPE = ROOT / "configs" / "smollm2-sharegpt.toml"
KS = (3, 5, 7)

# name -> (data: "sharegpt" | "regen", config overrides). "base" is the first measurement's
# settings (lr 1e-4, TTT 7, draft vocab 16384); the others change one or two things from it.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("sharegpt", []),
    "lr1e-3": ("sharegpt", ["training.lr=1e-3"]),
    "lr1e-3-ttt3": ("sharegpt", ["training.lr=1e-3", "model.llama-eagle3.ttt_length=3"]),
    "lr1e-3-v32k": ("sharegpt", ["training.lr=1e-3", "model.draft_vocab_size=32000"]),
    "lr1e-3-noclip": ("sharegpt", ["training.lr=1e-3", "training.max_grad_norm=0"]),
    "lr1e-3-lk": ("sharegpt", ["training.lr=1e-3", "training.loss=lk"]),
    # EAGLE-3.1: each aux state RMS-normed before fc (the target's massive activations stay out of fc)
    "lr1e-3-fcnorm": ("sharegpt", ["training.lr=1e-3", "model.llama-eagle3.fc_norm=true"]),
    "lr3e-3-fcnorm": ("sharegpt", ["training.lr=3e-3", "model.llama-eagle3.fc_norm=true"]),
    "lr1e-3-fcnorm-lk": ("sharegpt", ["training.lr=1e-3", "model.llama-eagle3.fc_norm=true", "training.loss=lk"]),
    # full EAGLE-3.1: fc_norm + norm_output (the next draft step reads the normed output)
    "eagle3.1": ("sharegpt", ["training.lr=1e-3", "model.llama-eagle3.fc_norm=true",
                              "model.llama-eagle3.norm_output=true"]),
    "regen-lr1e-3": ("regen", ["training.lr=1e-3"]),
    "regen-lr1e-3-fcnorm": ("regen", ["training.lr=1e-3", "model.llama-eagle3.fc_norm=true"]),
    # three times the budget (the first conversations of the same ShareGPT order): the curve
    "x3-lr1e-3-fcnorm": ("sharegpt-x3", ["training.lr=1e-3", "model.llama-eagle3.fc_norm=true"]),
    # all of ShareGPT (the first measurement was "all-base" served by vLLM: 1.40 at K=3)
    "all-base": ("sharegpt-all", []),
    "all-lr1e-3": ("sharegpt-all", ["training.lr=1e-3"]),
    # draft capacity: the same with two decoder layers (vLLM's multi-layer llama_eagle3; SGLang serves one)
    "all-lr1e-3-2l": ("sharegpt-all", ["training.lr=1e-3", "model.llama-eagle3.num_layers=2"]),
    # the other algorithms on the same data (docs/algorithms.md): 2-layer block drafts, blocks
    # trained at the lengths served for K = 3, 5, 7 (docs/dflash.md: block length)
    "dflash": ("sharegpt", ["training.lr=1e-3", "model.draft=dflash", "model.dflash.block_size=8",
                            "model.dflash.train_block_lengths=[4,6,8]"]),
    "dspark": ("sharegpt", ["training.lr=1e-3", "model.draft=dspark", "model.dspark.block_size=7",
                            "model.dspark.train_block_lengths=[3,5,7]"]),
    # P-EAGLE (docs/peagle.md): the peers' recipe (4 layers, 8 depths, COD 0.7 / 0.2), and at the block
    # drafts' size (2 layers)
    "peagle": ("sharegpt", ["training.lr=1e-3", "model.draft=peagle", "model.peagle.num_layers=4",
                            "model.peagle.num_depths=8"]),
    "peagle-2l": ("sharegpt", ["training.lr=1e-3", "model.draft=peagle", "model.peagle.num_layers=2",
                               "model.peagle.num_depths=8"]),
    # the block-length choice on the reference target: whole 8-slot blocks only
    "dflash-whole": ("sharegpt", ["training.lr=1e-3", "model.draft=dflash", "model.dflash.block_size=8"]),
    # the same on all of ShareGPT (beside all-lr1e-3; cap them with --set training.max_steps=...)
    "all-dflash": ("sharegpt-all", ["training.lr=1e-3", "model.draft=dflash", "model.dflash.block_size=8",
                                    "model.dflash.train_block_lengths=[4,6,8]"]),
    "all-dspark": ("sharegpt-all", ["training.lr=1e-3", "model.draft=dspark", "model.dspark.block_size=7",
                                    "model.dspark.train_block_lengths=[3,5,7]"]),
}


# ------------------------------------------------------------------------------------- prepare


def prepare(assets: Path, out: Path, budget: int, regen_prompts: int, max_prompt_tokens: int,
            multiples: tuple[int, ...] = (3,)) -> None:
    """The ShareGPT slice (gzip JSONL, whole conversations until ``budget`` assistant tokens), larger
    slices of the same order (``sharegpt-x{m}``: ``m`` times the budget), the first-turn prompts to
    regenerate from (the conversations after the largest slice, gzip JSONL) and MT-bench."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "smollm2-135m-instruct")
    out.mkdir(parents=True, exist_ok=True)
    lines = [x for x in (assets / "data" / "sharegpt.jsonl").read_text(encoding="utf-8").split("\n") if x]
    slices: dict[str, tuple[int, int]] = {}
    for m in (1, *multiples):  # 0: the whole file
        name = "sharegpt" if m == 1 else "sharegpt-all" if m == 0 else f"sharegpt-x{m}"
        n_tokens, taken = 0, 0
        with gzip.open(out / f"{name}.jsonl.gz", "wt", encoding="utf-8") as f:
            for line in lines:
                rec = json.loads(line)
                answers = [x["content"] for x in rec["messages"] if x["role"] == "assistant"]
                n_tokens += sum(len(ids) for ids in tok(answers, add_special_tokens=False)["input_ids"])
                f.write(line + "\n")
                taken += 1
                if m and n_tokens >= budget * m:
                    break
        slices[name] = (taken, n_tokens)
    taken, n_tokens = slices["sharegpt"]
    after = max(t for k, (t, _) in slices.items() if k != "sharegpt-all")  # prompts: after the slices
    prompts = 0
    with gzip.open(out / "prompts.jsonl.gz", "wt", encoding="utf-8") as f:
        for line in lines[after:]:
            rec = json.loads(line)
            first = next((m for m in rec["messages"] if m["role"] == "user"), None)
            if first is None or not first["content"].strip():
                continue
            if len(tok(first["content"], add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
                continue
            f.write(jsonl_line({"id": rec["id"], "prompt": first["content"]}) + "\n")
            prompts += 1
            if prompts >= regen_prompts:
                break
    (out / "mtbench.jsonl").write_text((assets / "data" / "mtbench.jsonl").read_text(encoding="utf-8"))
    meta = {"budget_tokens": budget, "sharegpt_conversations": taken, "sharegpt_assistant_tokens": n_tokens,
            "regen_prompts": prompts,
            "slices": {k: {"conversations": t, "assistant_tokens": n} for k, (t, n) in slices.items()}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))


# ------------------------------------------------------------------------------------- regenerate


def regenerate(model_dir: Path, prompts_gz: Path, out: Path, budget: int, max_new_tokens: int,
               batch_size: int, deadline_s: float = float("inf"), cache: str = "static",
               loop_tokens: int = 64) -> dict[str, Any]:
    """The target's own greedy answers to ShareGPT first turns until they hold ``budget`` tokens
    (or ``deadline_s`` seconds have passed: HF ``generate`` with its dynamic cache was measured on
    an H200 at 282 s for 612k tokens at batch 1024, so a time-boxed run stops early and says so).
    ``cache``: a path of ``benchmarks/regen_speed.py`` ('static': static KV cache, compiled decode;
    'dynamic': the old path). Answers whose tail loops for ``loop_tokens`` tokens or more are
    dropped and counted (``degenerate``)."""
    import torch
    from regen_speed import generate_kwargs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specforge_core.data.regenerate import loop_length

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:  # the GGUF's tokenizer names none; padding is masked anyway
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    with gzip.open(prompts_gz, "rt", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    # similar lengths together: less padding per batch
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                     add_generation_prompt=True) for r in recs]
    order = sorted(range(len(recs)), key=lambda i: len(texts[i]))
    n_tokens, written, degenerate = 0, 0, 0
    kwargs = generate_kwargs(cache)
    with open(out, "w", encoding="utf-8") as f, torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False,
                      pad_to_multiple_of=128).to("cuda")  # few prompt shapes: few compiled graphs
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                                 **kwargs)
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1]:], strict=True):
                ids = row.tolist()
                if tok.eos_token_id in ids:
                    ids = ids[: ids.index(tok.eos_token_id)]
                if loop_tokens and loop_length(ids)[1] >= loop_tokens:
                    degenerate += 1
                    continue
                answer = tok.decode(ids, skip_special_tokens=True).strip()
                if not answer:
                    continue
                f.write(jsonl_line({"id": f"regen-{recs[i]['id']}", "messages": [
                    {"role": "user", "content": recs[i]["prompt"]},
                    {"role": "assistant", "content": answer}]}) + "\n")
                n_tokens += len(ids)
                written += 1
            print(f"regen: {written} answers, {n_tokens} tokens, {degenerate} degenerate dropped, "
                  f"{time.time() - t0:.0f}s", flush=True)
            if n_tokens >= budget or time.time() - t0 > deadline_s:
                break
    del model
    torch.cuda.empty_cache()
    return {"conversations": written, "assistant_tokens": n_tokens, "degenerate": degenerate, "cache": cache,
            "wall_s": time.time() - t0}


# ------------------------------------------------------------------------------------------- run


def _gpu_shares(intervals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Each interval's integral of 1 / (intervals running at that moment)."""
    edges = sorted({t for iv in intervals.values() for t in iv})
    share = dict.fromkeys(intervals, 0.0)
    for a, b in zip(edges, edges[1:], strict=False):
        live = [n for n, (s, e) in intervals.items() if s <= a and e >= b]
        for n in live:
            share[n] += (b - a) / len(live)
    return share


def _last_metrics(log_path: Path) -> dict[str, Any]:
    """The last training log line (``step N/M | loss x | acc a b c | tau t``), parsed."""
    import re

    last: dict[str, Any] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = re.search(r"step (\d+)/(\d+) \| loss ([0-9.]+) \| acc ([0-9. ]+)\| tau ([0-9.]+)", line)
        if m:
            last = {"step": int(m[1]), "steps": int(m[2]), "loss": float(m[3]),
                    "acc": [float(x) for x in m[4].split()], "tau": float(m[5])}
            g = re.search(r"gnorm ([0-9.]+)", line)
            if g:
                last["gnorm"] = float(g[1])
    return last


def _convert_target(data: Path, model: Path) -> None:
    """The HF folder from the data folder's GGUF parts, when not there yet (regen_speed's)."""
    from regen_speed import convert_target

    convert_target(data, model)


def train_all(args: argparse.Namespace, names: list[str], data: Path, work: Path, model: Path,
              meta: dict[str, Any]) -> dict[str, Any]:
    """Every variant trained at once on the GPU (regenerated-data variants once the regeneration,
    which runs beside them, is done). Returns what the eval stage and the table need."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    paths: dict[str, Path] = {}
    for kind in {VARIANTS[n][0] for n in names} - {"regen"}:
        paths[kind] = work / f"{kind}.jsonl"
        with gzip.open(data / f"{kind}.jsonl.gz", "rt", encoding="utf-8") as src:
            paths[kind].write_text(src.read(), encoding="utf-8")
    procs: dict[str, subprocess.Popen] = {}
    intervals: dict[str, tuple[float, float]] = {}
    starts: dict[str, float] = {}

    def launch(name: str, path: Path) -> None:
        _, overrides = VARIANTS[name]
        cmd = [sys.executable, "-m", "specforge_core.cli", "run", str(args.recipe), f"model.target={model}",
               f"dataset.path=[\"{path}\"]", f"run.output_dir={work / name}", f"run.name=q-{name}",
               f"dataset.cache_dir={work / 'cache' / name}", "logging.progress=false", "training.log_every=25",
               *overrides, *args.set]
        log = open(work / f"{name}.train.log", "w")
        starts[name] = time.time()
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    for n in names:
        if VARIANTS[n][0] != "regen":
            launch(n, paths[VARIANTS[n][0]])
    # regeneration runs beside the ShareGPT trainings (a thread: the GPU has room for both); the
    # variants that train on it start when it is done
    import threading

    regen_box: dict[str, Any] = {}
    regen_names = [n for n in names if VARIANTS[n][0] == "regen"]
    regen_path = work / "regen.jsonl"
    regen_thread = None
    if regen_names:
        def _regen() -> None:
            regen_box["info"] = regenerate(model, data / "prompts.jsonl.gz", regen_path,
                                           meta["sharegpt_assistant_tokens"], args.regen_max_new_tokens,
                                           args.regen_batch_size, args.regen_deadline, args.regen_cache)

        regen_thread = threading.Thread(target=_regen, daemon=True)
        regen_thread.start()

    rc: dict[str, int] = {}
    t_start = time.time()
    deadline = t_start + args.train_deadline
    while len(rc) < len(procs) or (regen_thread is not None and regen_names[0] not in procs):
        if regen_thread is not None and not regen_thread.is_alive() and regen_names[0] not in procs:
            if "info" not in regen_box:
                print("regeneration failed; its variants are skipped", flush=True)
                regen_thread = None
            else:
                print(f"regenerated: {regen_box['info']}", flush=True)
                for n in regen_names:
                    launch(n, regen_path)
        for n, p in procs.items():
            if n not in rc and p.poll() is not None:
                rc[n] = p.returncode
                intervals[n] = (starts[n], time.time())
                print(f"trained {n}: rc {p.returncode} in {intervals[n][1] - starts[n]:.0f}s "
                      f"{_last_metrics(work / f'{n}.train.log')}", flush=True)
        if time.time() > deadline:
            for n, p in procs.items():
                if n not in rc:
                    p.kill()
                    rc[n] = -9
                    intervals[n] = (starts[n], time.time())
                    print(f"killed {n}: past the training deadline", flush=True)
            if regen_thread is not None and regen_names[0] not in procs:
                break  # the regeneration is still running: its variants are lost
        time.sleep(1)
    return {"rc": rc, "intervals": intervals, "regen": regen_box.get("info"), "train_wall_s": time.time() - t_start}


def eval_command(export: Path, model: Path, mtbench: Path, k: int, report: Path, *, max_new_tokens: int,
                 device: str, batch_size: int = 80, dtype: str = "fp32", chat_template: str = "auto",
                 max_prompts: Optional[int] = None) -> list[str]:
    """`specforge eval` of one export at K on MT-bench, as every quality benchmark runs it (no
    correctness guard: each export is evaluated at several K, the guard is the tests' job)."""
    return [sys.executable, "-m", "specforge_core.cli", "eval", "--draft", str(export), "--target", str(model),
            "--data", str(mtbench), "--steps", str(k), "--max-new-tokens", str(max_new_tokens),
            "--batch-size", str(batch_size), "--device", device, "--dtype", dtype, "--no-check",
            "--chat-template", chat_template, *(["--max-prompts", str(max_prompts)] if max_prompts else []),
            "--json", str(report)]


def run_parallel(jobs: list[tuple[Any, list[str], Path]], parallel: int, deadline_s: float,
                 on_done: Callable[[Any, int, float], None]) -> None:
    """Each ``(key, command, log)`` as a subprocess, ``parallel`` at a time in list order; ``on_done(key,
    returncode, seconds)`` as each ends. Those still running ``deadline_s`` after the start are
    killed (and not reported)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    todo = list(jobs)
    running: dict[Any, tuple[subprocess.Popen, float]] = {}
    deadline = time.time() + deadline_s
    while todo or running:
        while todo and len(running) < parallel:
            key, cmd, log = todo.pop(0)
            running[key] = (subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                             env=env), time.time())
        for key, (p, t0) in list(running.items()):
            if p.poll() is not None:
                del running[key]
                on_done(key, p.returncode, time.time() - t0)
            elif time.time() > deadline:
                p.kill()
                print(f"killed {key}: past the deadline", flush=True)
                del running[key]
        time.sleep(0.5)


def eval_all(args: argparse.Namespace, names: list[str], data: Path, work: Path, model: Path,
             rc: dict[str, int]) -> dict[tuple[str, int], float]:
    """Every trained variant at every K, ``--eval-parallel`` processes at a time; K in ``--ks`` order
    (a deadline cuts the last ones)."""
    ks = [int(k) for k in args.ks.split(",")]
    jobs = [((n, k), eval_command(work / n / "export", model, data / "mtbench.jsonl", k, work / f"{n}.k{k}.json",
                                  max_new_tokens=args.max_new_tokens, device=args.device,
                                  batch_size=args.eval_batch_size, dtype=args.eval_dtype,
                                  chat_template=args.chat_template, max_prompts=args.max_prompts),
             work / f"{n}.k{k}.eval.log")
            for k in ks for n in names if rc.get(n) == 0 and (work / n / "export").is_dir()]
    eval_wall: dict[tuple[str, int], float] = {}

    def done(key: tuple[str, int], code: int, seconds: float) -> None:
        eval_wall[key] = seconds
        print(f"evaluated {key[0]} K={key[1]}: rc {code} in {seconds:.0f}s", flush=True)

    run_parallel(jobs, args.eval_parallel, args.eval_deadline, done)
    return eval_wall


def run(args: argparse.Namespace) -> int:
    import torch

    t_start = time.time()
    data = Path(args.data).resolve()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model).resolve()
    _convert_target(data, model)
    meta = json.loads((data / "meta.json").read_text())
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")

    # two stages so that each fits one device call: train (state kept in the work dir), then eval
    state_path = work / "train_state.json"
    if args.stage in ("train", "all"):
        st = train_all(args, names, data, work, model, meta)
        state_path.write_text(json.dumps(st, indent=1) + "\n")
    st = json.loads(state_path.read_text())
    rc = {n: int(c) for n, c in st["rc"].items()}
    intervals = {n: (float(a), float(b)) for n, (a, b) in st["intervals"].items()}
    shares = _gpu_shares(intervals)
    eval_wall: dict[tuple[str, int], float] = {}
    if args.stage in ("eval", "all"):
        eval_wall = eval_all(args, names, data, work, model, rc)

    regen_info = st.get("regen")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "meta": meta,
        "regen": regen_info, "ks": list(KS),
        "max_new_tokens": args.max_new_tokens, "recipe": str(Path(args.recipe).resolve().relative_to(ROOT)), "extra_overrides": args.set,
        "train_wall_s": st.get("train_wall_s"), "stage_wall_s": None, "variants": {},
    }
    regen_names = [n for n in names if VARIANTS[n][0] == "regen"]
    regen_share = (regen_info["wall_s"] / len(regen_names)) if regen_info else 0.0
    for n in names:
        data_kind, overrides = VARIANTS[n]
        v: dict[str, Any] = {"data": data_kind, "overrides": overrides, "train_rc": rc.get(n),
                             "train_wall_s": intervals[n][1] - intervals[n][0] if n in intervals else None,
                             "gpu_s": shares.get(n, 0.0) + (regen_share if data_kind == "regen" else 0.0),
                             "train_log_tail": _last_metrics(work / f"{n}.train.log")
                             if (work / f"{n}.train.log").is_file() else {}, "eval": {}}
        for k in KS:
            path = work / f"{n}.k{k}.json"
            if path.is_file():
                rep = json.loads(path.read_text())
                v["eval"][str(k)] = {"tau": rep["overall"]["tau"], "rates": rep["overall"]["accept_rates"],
                                     "categories": {c: s["tau"] for c, s in rep["categories"].items()},
                                     "wall_s": eval_wall.get((n, k))}
        results["variants"][n] = v
    results["stage_wall_s"] = time.time() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    t = Table(title=f"MT-bench acceptance length (first turns, greedy, {results['max_new_tokens']} new tokens), "
                    f"budget {results['meta']['sharegpt_assistant_tokens']} assistant tokens")
    for col in ("variant", "data", "train s", "GPU-s", "K=3", "K=5", "K=7", "acc0..2 @K=7"):
        t.add_column(col)
    cats: set[str] = set()
    for n, v in results["variants"].items():
        ev = v["eval"]
        rates = ev.get("7", {}).get("rates", [])
        t.add_row(n, v["data"], f"{v['train_wall_s'] or 0:.0f}", f"{v['gpu_s']:.0f}",
                  *[f"{ev[str(k)]['tau']:.3f}" if str(k) in ev else "-" for k in KS],
                  " ".join(f"{r:.2f}" for r in rates[:3]))
        for e in ev.values():
            cats |= set(e["categories"])
    console.print(t)
    if cats:
        c = Table(title="per category, K=7")
        c.add_column("variant")
        for cat in sorted(cats):
            c.add_column(cat[:9])
        for n, v in results["variants"].items():
            cat_tau = v["eval"].get("7", {}).get("categories", {})
            c.add_row(n, *[f"{cat_tau[x]:.2f}" if x in cat_tau else "-" for x in sorted(cats)])
        console.print(c)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="ShareGPT slice + regeneration prompts + MT-bench (CPU)")
    p.add_argument("--assets", type=Path, default=Path("reference"), help="`specforge reference fetch` output")
    p.add_argument("--out", type=Path, default=Path(".carry/quality"))
    p.add_argument("--budget", type=int, default=1_000_000, help="assistant tokens of ShareGPT per variant")
    p.add_argument("--regen-prompts", type=int, default=6000, help="first turns shipped for regeneration")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--multiples", type=int, nargs="*", default=[3],
                   help="also slices of this many times the budget (variants on data sharegpt-x{m}); "
                        "0: the whole file (sharegpt-all)")
    r = sub.add_parser("run", help="train and evaluate the variants on one GPU")
    r.add_argument("--data", default=".carry/quality", help="the prepare output")
    r.add_argument("--model", default="reference/smollm2-135m-instruct",
                   help="target HF folder (converted from the data folder's GGUF parts when absent)")
    r.add_argument("--work", default="/tmp/quality", help="run dirs, logs and eval reports")
    r.add_argument("--recipe", default=str(RECIPE), help="the config every variant overrides (the target's "
                   "recipe: configs/gemma3-270m-sharegpt.toml for Gemma 3 270M)")
    r.add_argument("--chat-template", default="auto", help="MT-bench prompts' template for eval ('gemma' for "
                   "Gemma 3 270M base, whose tokenizer has none)")
    r.add_argument("--out", default="benchmarks/results/quality_h200.json")
    r.add_argument("--variants", default=",".join(VARIANTS))
    r.add_argument("--set", nargs="*", default=[], help="extra overrides for every variant")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--max-prompts", type=int, default=None, help="MT-bench prompts evaluated (default: all 80)")
    r.add_argument("--device", default="cuda", help="eval device (cpu only for a smoke test)")
    r.add_argument("--eval-batch-size", type=int, default=80)
    r.add_argument("--eval-parallel", type=int, default=8)
    r.add_argument("--eval-dtype", default="fp32", choices=("fp32", "bf16"))
    r.add_argument("--regen-max-new-tokens", type=int, default=512)
    r.add_argument("--regen-batch-size", type=int, default=512)
    r.add_argument("--regen-deadline", type=float, default=90, help="seconds of generation at most")
    r.add_argument("--regen-cache", default="static", choices=("dynamic", "static", "static-eager"),
                   help="generate's KV cache (benchmarks/regen_speed.py compares them)")
    r.add_argument("--train-deadline", type=float, default=330, help="seconds from start; later runs are killed")
    r.add_argument("--eval-deadline", type=float, default=150, help="seconds for all evaluations")
    r.add_argument("--stage", choices=("all", "train", "eval"), default="all",
                   help="train only (state kept in --work), eval only (of a trained --work), or both")
    r.add_argument("--ks", default="3,7,5", help="draft lengths evaluated, in this order")
    r.add_argument("--table", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.assets, args.out, args.budget, args.regen_prompts, args.max_prompt_tokens,
                tuple(args.multiples))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
