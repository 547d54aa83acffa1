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
- ``degenerate: <loop>``: a reply ends in a loop (its last ``regenerate.loop_tokens`` or more tokens
  repeat one short period, ``loop_length``: a greedy target's answers do this on some prompts),
  written with no turns so training skips it;
- ``failed: <error>``: the backend raised on its batch.

The file's first line is a header (``{"specforge_regenerate_header": {...}}``, skipped by the
loader): the sha256 of every input file and every setting that changes the records (target,
backend, template, reasoning, lengths, sampling, ``max_samples``). A rerun resumes only a file
whose header equals its own; another input or setting is refused naming what differs, or, with
``restart=True`` (``--restart``), the old file is moved aside and a new one started.

Crash safety: records are appended and fsync'd after every batch. A rerun reads the file, drops a
torn last line, and regenerates only the indices that are missing, so a crash or Ctrl-C loses at
most the batch in flight and never duplicates a record. ``<output>.summary.json`` holds the counts.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from specforge_core.components import has_capability
from specforge_core.data.formats import REGENERATE_HEADER, Conversation, DataError, Turn, load_conversations
from specforge_core.data.tokenize import encode_prompt
from specforge_core.files import file_sha256

log = logging.getLogger(__name__)
ROLE_OUT = {"system": "system", "user": "human", "assistant": "gpt"}
HEADER_VERSION = 1


def output_path(config: Any) -> Path:
    return Path(config.regenerate.output or Path(config.output_dir) / "regenerated.jsonl")


def header(config: Any) -> dict[str, Any]:
    """What the output's records depend on: the input files' bytes (not their paths: a moved input
    is the same input) and every setting that changes a record."""
    r, ds, inf = config.regenerate, config.dataset, config.inference
    return {
        "version": HEADER_VERSION,
        "input_sha256": [file_sha256(p) for p in ds.path],
        "input_files": [str(p) for p in ds.path],  # informative only: not compared
        "max_samples": ds.max_samples, "format": ds.format, "on_error": ds.on_error, "reasoning": ds.reasoning,
        "chat_template": ds.chat_template, "max_seq_length": ds.max_seq_length,
        "target": str(config.model.target), "backend": inf.backend, "dtype": inf.dtype,
        "temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens, "stop": list(r.stop),
        "seed": r.seed, "batch_size": r.batch_size, "loop_tokens": r.loop_tokens,
    }


MAX_LOOP_PERIOD = 64  # longest repeated unit looked for (a sentence or two of a looping answer)


def loop_length(ids: Sequence[int], max_period: int = MAX_LOOP_PERIOD) -> tuple[int, int]:
    """``(period, tokens)``: the longest tail of ``ids`` that repeats one period (every token equals
    the one ``period`` before it), over periods 1..``max_period`` whose tail holds at least 3 of
    them; ``(0, 0)`` if none. A greedy loop ("I am sorry. I am sorry. ...") has a long tail."""
    best = (0, 0)
    n = len(ids)
    for p in range(1, min(max_period, n // 3) + 1):
        run = 0
        j = n - 1
        while j - p >= 0 and ids[j] == ids[j - p]:
            run += 1
            j -= 1
        tail = run + p  # the first period of the tail is not counted by the comparisons
        if run and tail >= 3 * p and tail > best[1]:
            best = (p, tail)
    return best


def header_changes(stored: dict, wanted: dict) -> list[str]:
    """Each compared key that differs, as ``key: file X, config Y``."""
    out = []
    for k in wanted:
        if k == "input_files" or stored.get(k) == wanted[k]:
            continue
        if k == "input_sha256":
            out.append(f"input files' content (dataset.path {wanted['input_files']} vs the file's "
                       f"{stored.get('input_files')}: sha256 differs)")
        else:
            out.append(f"{k}: file {stored.get(k)!r}, config {wanted[k]!r}")
    return out


def read_done(path: Path) -> dict[int, dict]:
    """Finished records by input index (the header line is not one). A torn last line (a crash
    mid-write) is cut off the file."""
    return _read(path)[1]


def read_header(path: Path) -> Optional[dict]:
    return _read(path)[0]


def _read(path: Path) -> tuple[Optional[dict], dict[int, dict]]:
    done: dict[int, dict] = {}
    if not path.exists():
        return None, done
    raw = path.read_bytes()
    good = raw.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    head = None
    for lineno, line in enumerate(raw[:good].split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if lineno == 1 and isinstance(rec, dict) and REGENERATE_HEADER in rec:
                head = rec[REGENERATE_HEADER]
                continue
            done[int(rec["index"])] = rec
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: not a record of `specforge data regenerate` ({e}); use another "
                            "regenerate.output or --restart") from None
    return head, done


def _prepare_output(out: Path, wanted: dict, restart: bool, say: Any) -> dict[int, dict]:
    """The finished records of a file written with these inputs and settings (empty for a new file);
    refuses any other file (naming what differs) unless ``restart``, which moves it aside."""
    stored, done = _read(out)
    if out.exists() and out.stat().st_size:
        if stored is None:
            why = "it has no regenerate header (written by an older specforge or another tool)"
        else:
            changes = header_changes(stored, wanted)
            why = "it was written with other inputs or settings: " + "; ".join(changes) if changes else ""
        if why and not restart:
            raise DataError(f"regenerate.output {out}: {why}. Resuming would mix records; use another "
                            "regenerate.output, or `specforge data regenerate --restart` to move it aside and "
                            "start a new file")
        if why:
            aside = out.with_name(f"{out.name}.replaced-{datetime.datetime.now():%Y%m%d-%H%M%S}")
            os.replace(out, aside)
            say(f"regenerate: {out} was written with other inputs or settings; moved it to {aside}, starting anew")
            stored, done = None, {}
    if stored is None:  # a new file: the header first, durable before any record
        with open(out, "w", encoding="utf-8") as f:
            f.write(json.dumps({REGENERATE_HEADER: wanted}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return done


def _record(index: int, conv: Conversation, turns: list[Turn], status: str) -> dict:
    return {"index": index, "id": conv.sample_id, "status": status, "source": conv.source,
            "conversations": [{"from": ROLE_OUT[t.role], "value": t.content} for t in turns]}


def regenerate(config: Any, backend: Any = None, console: Any = None, stop_after_batches: Optional[int] = None,
               restart: bool = False) -> dict[str, int]:
    """Regenerate ``dataset.path`` into ``output_path(config)``; returns the status counts.
    ``restart``: an output file written with other inputs or settings is moved aside (else refused)."""
    from specforge_core.build import create
    from specforge_core.components import GenerationParams
    from specforge_core.data import load_tokenizer

    r, ds = config.regenerate, config.dataset
    convs, _stats = load_conversations(ds.path, ds.format, ds.on_error, require_assistant=False,
                                       reasoning=ds.reasoning)
    if ds.max_samples:
        convs = convs[: ds.max_samples]
    out = output_path(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else log.info
    done = _prepare_output(out, header(config), restart, say)
    todo = [i for i in range(len(convs)) if i not in done]
    if done:
        say(f"regenerate: resuming {out}: {len(done)} of {len(convs)} records already there, {len(todo)} to go")
    tokenizer = load_tokenizer(config.model.target)
    own = backend is None
    if own:  # the backend is built as a run builds it (aux layers resolved), though only its text is used
        from specforge_core.target import with_aux_layers

        full = with_aux_layers(config)
        backend = create(full, "target_backend", full, None)
    if not has_capability(backend, "TargetBackend.generate_text"):
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
                records, n_tok = _regenerate_batch(batch, convs, backend, tokenizer, params, ds, r.loop_tokens)
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
                      params: Any, ds: Any, loop_tokens: int = 0) -> tuple[list[dict], int]:
    """Turn by turn over the batch's conversations: every conversation still going contributes its
    next prompt to one ``generate_text`` call."""
    # history: the turns kept so far; pending: the user/system turns before the next reply
    state = {i: {"history": [], "rest": list(convs[i].turns), "status": "ok", "too_long": False} for i in batch}
    n_tok = 0
    try:
        while True:
            prompts, owners = [], []
            for i, st in state.items():
                reply_due = False
                while st["rest"] and not reply_due:
                    # move the turns before the next assistant turn into the history
                    while st["rest"] and st["rest"][0].role != "assistant":
                        st["history"].append(st["rest"].pop(0))
                    if st["rest"]:
                        st["rest"].pop(0)  # the original reply: replaced by the target's
                        # (a reply before any user turn, e.g. a greeting, is dropped; later turns are kept)
                        reply_due = any(t.role == "user" for t in st["history"])
                if not reply_due:
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
                ids = list(g.token_ids)[: -1 if g.finish_reason == "stop" and g.token_ids else None]  # no EOS
                period, tail = loop_length(ids) if loop_tokens else (0, 0)
                if loop_tokens and tail >= loop_tokens:  # no further turns: the conversation is dropped
                    st["rest"], st["loop"] = [], (period, tail)
                    continue
                if g.finish_reason == "length":
                    st["status"] = "truncated"
    except Exception as exc:  # the backend failed this batch: record it, go on with the next
        return [_record(i, convs[i], [], f"failed: {type(exc).__name__}: {exc}") for i in batch], n_tok
    records = []
    for i, st in state.items():
        if "loop" in st:
            p, tail = st["loop"]
            records.append(_record(i, convs[i], [], f"degenerate: a reply ends in {tail} tokens repeating a "
                                                   f"{p}-token period"))
        elif not any(t.role == "assistant" for t in st["history"]):
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
