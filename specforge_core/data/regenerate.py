"""``specforge data regenerate``: the target rewrites every assistant turn of a conversation dataset.

A draft learns the distribution it is trained on; responses written by another model (ShareGPT's
ChatGPT replies) are not the target's. Here the target answers each user turn itself, turn by turn,
so turn 2 is conditioned on the target's own turn 1 (on-policy, multi-turn), with the chat template
the training uses. Generation goes through the configured target backend's optional
``generate_text`` (``components.TargetBackend``): hf in-process, vllm in its own process.

Output: JSONL in the ShareGPT layout the loader reads, one line per input conversation, in input
order, each with its input ``index`` and a ``status``:

- ``ok``: every assistant turn regenerated;
- ``truncated``: a reply hit ``regenerate.max_new_tokens`` (kept: the text is the target's, only
  its end of turn is missing);
- ``skipped: <why>``: nothing to regenerate (no user turn, the first prompt is longer than
  ``dataset.max_seq_length``), written with no turns so training skips it;
- ``failed: <error>``: the backend raised on its batch.

Crash safety: records are appended and fsync'd after every batch. A rerun reads the file, drops a
torn last line, and regenerates only the indices that are missing, so a crash or Ctrl-C loses at
most the batch in flight and never duplicates a record. ``<output>.summary.json`` holds the counts.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from specforge_core.data.formats import Conversation, Turn, load_conversations
from specforge_core.data.tokenize import encode_prompt

ROLE_OUT = {"system": "system", "user": "human", "assistant": "gpt"}


def output_path(config: Any) -> Path:
    return Path(config.regenerate.output or Path(config.output_dir) / "regenerated.jsonl")


def read_done(path: Path) -> dict[int, dict]:
    """Finished records by input index. A torn last line (a crash mid-write) is cut off the file."""
    done: dict[int, dict] = {}
    if not path.exists():
        return done
    raw = path.read_bytes()
    good = raw.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    for line in raw[:good].splitlines():
        if line.strip():
            rec = json.loads(line)
            done[int(rec["index"])] = rec
    return done


def _record(index: int, conv: Conversation, turns: list[Turn], status: str) -> dict:
    return {"index": index, "id": conv.sample_id, "status": status, "source": conv.source,
            "conversations": [{"from": ROLE_OUT[t.role], "value": t.content} for t in turns]}


def regenerate(config: Any, backend: Any = None, console: Any = None, stop_after_batches: Optional[int] = None
               ) -> dict[str, int]:
    """Regenerate ``dataset.path`` into ``output_path(config)``; returns the status counts."""
    from specforge_core.components import GenerationParams
    from specforge_core.data import load_tokenizer
    from specforge_core.training.components import create

    r, ds = config.regenerate, config.dataset
    convs, _stats = load_conversations(ds.path, ds.format, ds.on_error, require_assistant=False,
                                       reasoning=ds.reasoning)
    if ds.max_samples:
        convs = convs[: ds.max_samples]
    out = output_path(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    todo = [i for i in range(len(convs)) if i not in done]
    tokenizer = load_tokenizer(config.model.target)
    own = backend is None
    if own:
        backend = create(config, "target_backend", config, None)
    if not hasattr(backend, "generate_text"):
        raise ValueError(f"inference.backend = {config.inference.backend!r} cannot generate text "
                         "(it has no generate_text; docs/data.md lists the backends that do)")
    params = GenerationParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                              stop=list(r.stop), seed=r.seed)
    counts: Counter = Counter(rec["status"].split(":")[0] for rec in done.values())
    tokens = 0
    t0 = time.perf_counter()
    progress = _Progress(console, len(convs), len(done)) if console is not None else None
    try:
        with open(out, "a", encoding="utf-8") as f:
            for b, start in enumerate(range(0, len(todo), r.batch_size)):
                if stop_after_batches is not None and b >= stop_after_batches:
                    break
                batch = todo[start : start + r.batch_size]
                records, n_tok = _regenerate_batch(batch, convs, backend, tokenizer, params, ds)
                for rec in records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    counts[rec["status"].split(":")[0]] += 1
                f.flush()
                os.fsync(f.fileno())
                tokens += n_tok
                if progress:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    progress.update(len(records), f"{(start + len(batch)) / dt:.2f} rec/s, {tokens / dt:.0f} tok/s")
    finally:
        if progress:
            progress.close()
        if own:
            backend.close()
    summary = {"records": len(convs), **dict(counts), "generated_tokens_this_run": tokens,
               "seconds_this_run": round(time.perf_counter() - t0, 2)}
    tmp = out.with_name(out.name + ".summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out.with_name(out.name + ".summary.json"))
    return summary


def _regenerate_batch(batch: Sequence[int], convs: Sequence[Conversation], backend: Any, tokenizer: Any,
                      params: Any, ds: Any) -> tuple[list[dict], int]:
    """Turn by turn over the batch's conversations: every conversation still going contributes its
    next prompt to one ``generate_text`` call."""
    # history: the turns kept so far; pending: the user/system turns before the next reply
    state = {i: {"history": [], "rest": list(convs[i].turns), "status": "ok", "too_long": False} for i in batch}
    n_tok = 0
    try:
        while True:
            prompts, owners = [], []
            for i, st in state.items():
                # move the turns before the next assistant turn into the history
                while st["rest"] and st["rest"][0].role != "assistant":
                    st["history"].append(st["rest"].pop(0))
                while st["rest"]:
                    st["rest"].pop(0)  # the original reply: replaced by the target's
                    if any(t.role == "user" for t in st["history"]):
                        break  # (a reply before any user turn, e.g. a greeting, is dropped)
                else:
                    continue
                conv = Conversation(convs[i].sample_id, list(st["history"]), reasoning_mode=convs[i].reasoning_mode)
                ids = encode_prompt(tokenizer, conv, ds.chat_template)
                if len(ids) + 1 > ds.max_seq_length:  # no room to learn from this turn on: stop here
                    st["rest"], st["too_long"] = [], True
                    continue
                prompts.append(ids)
                owners.append(i)
            if not prompts:
                break
            for i, g in zip(owners, backend.generate_text(prompts, params), strict=True):
                st = state[i]
                st["history"].append(Turn("assistant", g.text))
                n_tok += len(g.token_ids)
                if g.finish_reason == "length":
                    st["status"] = "truncated"
    except Exception as exc:  # the backend failed this batch: record it, go on with the next
        return [_record(i, convs[i], [], f"failed: {type(exc).__name__}: {exc}") for i in batch], n_tok
    records = []
    for i, st in state.items():
        if not any(t.role == "assistant" for t in st["history"]):
            why = ("the first prompt is longer than dataset.max_seq_length" if st["too_long"]
                   else "no user turn before an assistant turn")
            records.append(_record(i, convs[i], [], f"skipped: {why}"))
        else:
            records.append(_record(i, convs[i], st["history"], st["status"]))
    return records, n_tok


class _Progress:
    """A rich progress bar: records done of all, time left, records/s and tokens/s."""

    def __init__(self, console: Any, total: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("regenerate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[rate]}"), console=console)
        self.task = self.p.add_task("regenerate", total=total, completed=done, rate="")
        self.p.start()

    def update(self, n: int, rate: str) -> None:
        self.p.update(self.task, advance=n, rate=rate)

    def close(self) -> None:
        self.p.stop()
