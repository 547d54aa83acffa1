"""``run_local``: the whole EAGLE-3 training run in one process.

data -> vocab mapping -> target backend (in-process) -> transfer store -> trainer -> checkpoints ->
export. Every sample's features go put -> get -> delete through the configured transfer store, so
the local path exercises the same hand-off a disaggregated (Ray) pipeline uses.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from specforge_core.config.schema import SpecforgeConfig
from specforge_core.types import Sample, TargetFeatures


@attrs.define
class RunResult:
    output_dir: Path
    steps: int  # optimizer steps done (in total, including those before a resume)
    history: list[dict[str, float]]  # metrics of the steps this call ran
    checkpoint: Optional[Path]
    export_dir: Optional[Path]
    accounting: dict[str, int]  # samples in / trained / skipped by reason
    wall_s: float


def vocab_mapping_path(config: SpecforgeConfig) -> Path:
    return Path(config.output_dir) / "vocab_mapping.safetensors"


def trainable(sample: Sample) -> bool:
    """Step 0 at position t predicts x_{t+2}: a sample needs a loss token at index >= 2."""
    return sample.num_tokens >= 3 and bool(sample.loss_mask[2:].any())


def format_metrics(m: dict[str, float], total_steps: int, ttt_length: int) -> str:
    # acc_k / accept_len only when the draft algorithm reports them
    accs = " ".join(f"{m[f'acc_{k}']:.2f}" for k in range(ttt_length) if f"acc_{k}" in m)
    return (
        f"step {int(m['step'])}/{total_steps} | loss {m['loss']:.4f} | "
        + (f"acc {accs} | " if accs else "")
        + (f"tau {m['accept_len']:.2f} | " if "accept_len" in m else "")
        + f"{m['tokens_per_s']:.0f} tok/s | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f}"
        + (f" | data wait {m['data_wait_s'] * 1e3:.0f} ms" if "data_wait_s" in m else "")
    )


class SampleOrder:
    """Seeded per-epoch permutation; the position (epoch, index) is what a checkpoint records."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.index = 0, 0
        self._perm = self._order(0)

    def permutation(self, epoch: int) -> list[int]:
        """The sample order of ``epoch`` (what ``take`` walks through)."""
        return self._order(epoch)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = epoch, index
        self._perm = self._order(epoch)

    def take(self, count: int) -> list[int]:
        """Up to ``count`` indices; an epoch's last step may be short (no sample is dropped)."""
        if self.index >= self.n:
            self.seek(self.epoch + 1, 0)
        out = self._perm[self.index : self.index + count]
        self.index += len(out)
        return out

    def visited_before(self) -> list[int]:
        """Indices visited before the current position (all of them after the first epoch)."""
        return list(range(self.n)) if self.epoch > 0 else self._perm[: self.index]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def _load_or_build_vocab(config: SpecforgeConfig, samples: Sequence[Sample], target_vocab: int, console):
    from specforge_core.vocab import VocabMapping, build_vocab_mapping

    path = vocab_mapping_path(config)
    trained = _resumed_vocab(config)
    if trained is not None:  # resume: the mapping the checkpoint's weights were trained with
        vocab, source = trained, f"{path} (resume)"
        if not path.exists() or not torch.equal(VocabMapping.load(str(path)).d2t, vocab.d2t):
            console.print(f"vocab mapping: {path} differs from the checkpoint's; restoring the trained one")
            vocab.save(str(path))
    elif config.model.vocab_mapping:
        vocab = VocabMapping.load(config.model.vocab_mapping)
        source = f"model.vocab_mapping = {config.model.vocab_mapping}"
    elif path.exists() and config.training.resume:
        vocab = VocabMapping.load(str(path))
        source = f"{path} (resume)"
    else:
        size = min(config.model.draft_vocab_size, target_vocab)
        vocab = build_vocab_mapping(samples, target_vocab, size)
        source = f"computed from {len(samples)} samples"
    if vocab.t2d.numel() != target_vocab:
        raise ValueError(
            f"vocab mapping ({source}) covers {vocab.t2d.numel()} target ids, but the target "
            f"{config.model.target!r} has vocab_size {target_vocab}"
        )
    if not source.endswith("(resume)"):
        # a fresh run owns its output_dir's mapping: never leave an older run's file behind, or
        # checkpoints and `specforge export` would pair these weights with the wrong vocab
        vocab.save(str(path))
    console.print(f"vocab mapping: draft vocab {vocab.d2t.numel()} of {target_vocab} target ids ({source})")
    return vocab, path


def _resumed_vocab(config: SpecforgeConfig):
    """The vocab mapping stored in the checkpoint a resumed run continues from (None: no resume,
    no checkpoint, or one older than stored mappings)."""
    from specforge_core.training import checkpoint as ckpt

    if not config.training.resume:
        return None
    latest = ckpt.latest_checkpoint(config.output_dir, report=lambda m: None)  # check_resume warned
    return ckpt.checkpoint_vocab(ckpt.read_extra(latest)) if latest is not None else None


@attrs.frozen
class BudgetPlan:
    """``training.token_budget``: the run's steps computed up front from the sample lengths (every
    epoch's seeded order through ``packing.budget_schedule``). ``steps[s]`` is step s's rows of
    sample indices, ``positions[s]`` the data position after it ({epoch, samples of that epoch
    trained}, what its checkpoint records); a resumed run recomputes the plan and continues at its
    step number."""

    steps: list[list[list[int]]]
    positions: list[dict[str, int]]
    dropped: list[int]  # samples of epoch tails too small to feed every rank (never trained)

    @classmethod
    def build(cls, lengths: Sequence[int], order: SampleOrder, row_tokens: int, n_rows: int,
              num_epochs: int, max_steps: int, min_step_samples: int = 1) -> BudgetPlan:
        """``min_step_samples``: the Ray pipeline's rank count (every rank needs a sample in every
        micro-step): an epoch's last step with fewer samples is left out, its samples ``dropped``."""
        from specforge_core.training.packing import budget_schedule

        steps: list[list[list[int]]] = []
        positions: list[dict[str, int]] = []
        dropped: list[int] = []
        epoch = 0
        while (len(steps) < max_steps) if max_steps > 0 else (epoch < num_epochs):
            done = 0
            for rows in budget_schedule(lengths, order.permutation(epoch), row_tokens, n_rows):
                n = sum(len(r) for r in rows)
                done += n
                if n < min_step_samples:  # only an epoch's tail can be this small
                    dropped.extend(i for r in rows for i in r)
                    continue
                steps.append(rows)
                positions.append({"epoch": epoch, "index": done})
            epoch += 1
        if max_steps > 0:
            steps, positions = steps[:max_steps], positions[:max_steps]
        return cls(steps, positions, dropped)

    def fill(self, lengths: Sequence[int], row_tokens: int) -> float:
        """Real tokens / positions over the plan's non-empty rows."""
        rows = [r for step in self.steps for r in step if r]
        return sum(lengths[i] for r in rows for i in r) / max(len(rows) * row_tokens, 1)

    def micro_batches(self, step: int, feats: Sequence[TargetFeatures], rows_per_micro: int, row_tokens: int,
                      device, dtype) -> list[Any]:
        """Step ``step``'s packed micro-batches from its features (in ``sample_indices`` order);
        micro-batches whose rows are all empty (an epoch's tail) are left out."""
        from specforge_core.training.packing import pack_rows

        rows = self.steps[step]
        at = {i: j for j, i in enumerate(self.sample_indices(step))}
        out = []
        for g in range(0, len(rows), rows_per_micro):
            group = rows[g : g + rows_per_micro]
            if any(group):
                members = [i for r in group for i in r]
                local = {i: k for k, i in enumerate(members)}
                out.append(pack_rows([feats[at[i]] for i in members], [[local[i] for i in r] for r in group],
                                     row_tokens, device, dtype))
        return out

    def sample_indices(self, step: int) -> list[int]:
        return [i for r in self.steps[step] for i in r]


def _fetch_features(backend, store, run_id: str, step: int, samples: list[Sample], batch_size: int,
                    device) -> list[TargetFeatures]:
    """Target inference, then every sample through the store: put -> get -> delete."""
    out: list[TargetFeatures] = []
    for start in range(0, len(samples), batch_size):
        for f in backend.generate(samples[start : start + batch_size]):
            key = f"{run_id}/{step}/{f.sample_id}"
            store.put(key, f.tensors())
            tensors = store.get(key, device)
            store.delete([key])
            out.append(TargetFeatures.from_tensors(f.sample_id, tensors, f.category))
    return out


def account(data_stats, n_samples: int, skipped: Counter, n_usable: int, seen: set[int]) -> dict[str, int]:
    acc = {
        "records_in": data_stats.lines,
        "trained": len(seen),
        "skipped: no assistant turn": data_stats.skipped_no_assistant,
        "skipped: malformed": data_stats.skipped_malformed,
        "skipped: nothing to learn after truncation": data_stats.skipped_no_loss,
        "skipped: over dataset.max_samples": data_stats.lines - n_samples - data_stats.skipped_no_assistant
        - data_stats.skipped_malformed - data_stats.skipped_no_loss,
        **{f"skipped: {k}": v for k, v in skipped.items()},
        "skipped: not reached (max_steps)": n_usable - len(seen),
    }
    total = acc["trained"] + sum(v for k, v in acc.items() if k.startswith("skipped"))
    if total != acc["records_in"]:
        raise RuntimeError(f"sample accounting does not add up: {acc}")
    return acc


def format_accounting(acc: dict[str, int]) -> str:
    skips = ", ".join(f"{v} {k[len('skipped: '):]}" for k, v in acc.items() if k.startswith("skipped") and v)
    return f"samples: {acc['records_in']} in = {acc['trained']} trained + skipped ({skips or 'none'})"


class _WandB:
    def __init__(self, config: SpecforgeConfig, config_toml: str):
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        import wandb  # lazy: an optional dependency

        self.wandb = wandb
        self.run = wandb.init(
            project=config.logging.wandb_project, name=config.run.name, mode=config.logging.wandb_mode,
            dir=str(config.output_dir), config=tomllib.loads(config_toml),
        )

    def log(self, metrics: dict[str, float]) -> None:
        self.run.log({f"train/{k}": v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    def finish(self) -> None:
        self.run.finish()


def load_training_samples(config: SpecforgeConfig, console: Any):
    """Tokenized samples (cached) and the ones with something to learn, with skip reasons; shared
    by every pipeline so their accounting agrees."""
    from specforge_core.data import build_samples, load_tokenizer

    tokenizer = load_tokenizer(config.model.target, config.model.trust_remote_code)
    samples, data_stats = build_samples(config.dataset, tokenizer, progress=config.logging.progress)
    console.print(f"data: {data_stats.summary()}")
    usable = [s for s in samples if trainable(s)]
    skipped: Counter[str] = Counter()
    skipped["no loss token at index >= 2"] = len(samples) - len(usable)
    if not usable:
        raise ValueError(f"dataset.path = {config.dataset.path}: no sample has anything to learn")
    return samples, usable, data_stats, skipped


def run_local(
    config: SpecforgeConfig,
    *,
    stop_after_steps: Optional[int] = None,  # end early as if killed (tests of resume)
    console: Any = None,
    target_backend: Any = None,  # a ready-made TargetBackend (the caller closes it)
    transfer_store: Any = None,  # a ready-made TransferStoreProvider
    registry: Any = None,  # the plugin registry to build components with (None: entry points)
) -> RunResult:
    from rich.console import Console

    from specforge_core import rundir
    from specforge_core.config import dump_toml
    from specforge_core.plan import with_aux_layers
    from specforge_core.training.components import create

    t0 = time.perf_counter()
    console = console or Console(soft_wrap=True)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_toml = dump_toml(config)
    # Everything opened from here on is closed in reverse order, also when a step raises.
    with contextlib.ExitStack() as cleanup:
        # one run per output_dir; a fresh run never mixes with another run's checkpoints
        cleanup.enter_context(rundir.lock(out_dir, warn=console.print))
        rundir.claim(out_dir, config.training.resume, config.run.name)
        if config.training.resume:
            rundir.check_resume(config, config_toml, warn=console.print)
        (out_dir / "config.toml").write_text(config_toml)
        # unset model.aux_layers = the draft algorithm's default for this target (config.toml keeps
        # it unset, as the user wrote it); the backend, the trainer and the export read this list
        config = with_aux_layers(config, registry)
        random.seed(config.run.seed)
        torch.manual_seed(config.run.seed)

        # ---- data
        samples, usable, data_stats, skipped = load_training_samples(config, console)

        # ---- target, vocab
        device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = target_backend
        provider = transfer_store if transfer_store is not None else create(config, "transfer_store",
                                                                            registry=registry)
        if backend is None and getattr(provider, "supplies_features", False):
            # the store serves features written beforehand (`specforge data features`): no target
            backend = provider.feature_source(config)
            cleanup.callback(backend.close)
        if backend is None:
            backend = create(config, "target_backend", config, device, registry=registry)
            cleanup.callback(backend.close)
        return _train(config, backend, provider, cleanup, console, config_toml, stop_after_steps, t0,
                      data=(samples, usable, data_stats, skipped), registry=registry)


def _train(config, backend, provider, cleanup, console, config_toml, stop_after_steps, t0, data,
           registry=None) -> RunResult:
    """Vocab -> trainer (+ resume) -> transfer store -> the step loop -> final checkpoint + export."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from specforge_core.export import export_draft
    from specforge_core.training import checkpoint as ckpt
    from specforge_core.training.components import create
    from specforge_core.training.trainer import Trainer

    samples, usable, data_stats, skipped = data
    tr = config.training
    out_dir = Path(config.output_dir)
    info = backend.info
    vocab, vocab_path = _load_or_build_vocab(config, usable, info.vocab_size, console)

    # ---- plan
    per_step = tr.micro_batch_size * tr.gradient_accumulation
    steps_per_epoch = math.ceil(len(usable) / per_step)
    total_steps = tr.max_steps if tr.max_steps > 0 else tr.num_epochs * steps_per_epoch
    order = SampleOrder(len(usable), config.run.seed, config.dataset.shuffle)
    budget: Optional[BudgetPlan] = None
    if tr.token_budget and tr.pack_tokens:  # (the trainer rejects token_budget without pack_tokens)
        lengths = [s.num_tokens for s in usable]
        budget = BudgetPlan.build(lengths, order, tr.pack_tokens, per_step, tr.num_epochs, tr.max_steps)
        total_steps = len(budget.steps)

    trainer = Trainer(config, info, vocab, total_steps, registry=registry)
    start_step = 0
    seen: set[int] = set()  # indices into `usable` trained at least once
    if tr.resume:
        latest = ckpt.latest_checkpoint(out_dir, report=lambda m: None)  # check_resume said which
        if latest is not None:
            extra = ckpt.load(trainer, latest)
            if budget is not None:
                _check_budget_position(budget, trainer.step, extra["data_position"], latest)
                seen.update(i for s in range(trainer.step) for i in budget.sample_indices(s))
            else:
                order.seek(**extra["data_position"])
                seen.update(order.visited_before())
            start_step = trainer.step
            console.print(f"resumed from {latest} (step {trainer.step}, data position {extra['data_position']})")
        else:
            console.print(f"training.resume: no complete checkpoint under {ckpt.checkpoint_root(out_dir)}; starting fresh")
    shape = (f"token budget: {tr.gradient_accumulation} x {tr.micro_batch_size} rows of {tr.pack_tokens} positions "
             f"per step, {budget.fill(lengths, tr.pack_tokens):.1%} full" if budget is not None else f"{per_step} per step")
    console.print(
        f"training: {len(usable)} samples, {shape}, {total_steps} steps, "
        f"ttt_length {tr.ttt_length}, device {trainer.device}, dtype {str(trainer.dtype).replace('torch.', '')}"
    )

    wandb = _WandB(config, config_toml) if config.logging.wandb else None
    if wandb:
        cleanup.callback(wandb.finish)
    provider = provider if provider is not None else create(config, "transfer_store", registry=registry)
    run_id = f"{config.run.name}-{uuid.uuid4().hex[:8]}"
    handle = provider.start(run_id)
    cleanup.callback(provider.stop, handle)
    store = provider.connect(handle)
    cleanup.callback(store.close)
    history: list[dict[str, float]] = []
    trained = 0
    last_ckpt: Optional[Path] = None
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(), console=console, disable=not config.logging.progress,
    )

    def save() -> Path:
        position = budget.positions[trainer.step - 1] if budget is not None and trainer.step else order.position()
        return ckpt.save(trainer, out_dir, data_position=position, config_toml=config_toml,
                         vocab_path=str(vocab_path), keep=tr.keep_checkpoints)

    from specforge_core.profiling import StepProfiler

    profiler = cleanup.enter_context(StepProfiler(config.profiler, str(out_dir)))
    with progress:
        task = progress.add_task("train", total=total_steps, completed=trainer.step, info="")
        while trainer.step < total_steps:
            indices = budget.sample_indices(trainer.step) if budget is not None else order.take(per_step)
            seen.update(indices)
            picked = [usable[i] for i in indices]
            feats = _fetch_features(backend, store, run_id, trainer.step, picked,
                                    config.inference.batch_size, trainer.device)
            if budget is not None:
                micro = budget.micro_batches(trainer.step, feats, tr.micro_batch_size, tr.pack_tokens,
                                             trainer.device, trainer.dtype)
            else:
                micro = [feats[i : i + tr.micro_batch_size] for i in range(0, len(feats), tr.micro_batch_size)]
            metrics = trainer.train_step(micro)
            profiler.step()
            trained += len(feats)
            history.append(metrics)
            info_line = f"loss {metrics['loss']:.3f}" + (f" acc_0 {metrics['acc_0']:.2f}" if "acc_0" in metrics else "")
            progress.update(task, completed=trainer.step, info=info_line)
            if trainer.step % tr.log_every == 0 or trainer.step == total_steps:
                progress.console.print(format_metrics(metrics, total_steps, tr.ttt_length))
            if wandb:
                wandb.log(metrics)
            if tr.save_every and trainer.step % tr.save_every == 0:
                last_ckpt = save()
            if stop_after_steps is not None and trainer.step - start_step >= stop_after_steps:
                break
    finished = trainer.step >= total_steps
    if finished and (last_ckpt is None or last_ckpt != ckpt.checkpoint_dir(out_dir, trainer.step)):
        last_ckpt = save()
    leftover = store.count()
    if leftover:
        raise RuntimeError(f"transfer store still holds {leftover} keys at the end of the run")

    export_dir = export_draft(trainer.draft, vocab, out_dir / "export") if finished else None

    # ---- accounting: every record read is trained (at least once) or skipped for a reason
    accounting = account(data_stats, len(samples), skipped, len(usable), seen)
    wall = print_run_end(console, accounting, last_ckpt, export_dir, t0)
    return RunResult(out_dir, trainer.step, history, last_ckpt, export_dir, accounting, wall)


def _check_budget_position(budget: BudgetPlan, step: int, saved: dict[str, int], checkpoint: Path) -> None:
    """A resumed token-budget run recomputes its plan: the checkpoint's data position must be the
    plan's after the same step, or the data or the packing settings changed since."""
    want = budget.positions[step - 1] if 0 < step <= len(budget.positions) else None
    if want is None or dict(saved) != want:
        raise ValueError(
            f"{checkpoint}: data position {dict(saved)} after step {step}, but this config's token-budget plan "
            f"has {want}: the dataset or training.pack_tokens / micro_batch_size / gradient_accumulation / "
            f"num_epochs / max_steps changed since the checkpoint; resume with the settings it was written with")


def print_run_end(console: Any, accounting: Any, last_ckpt: Optional[Path], export_dir: Optional[Path],
                  t0: float) -> float:
    """The closing lines every pipeline prints: accounting, checkpoint, export, wall time."""
    console.print(format_accounting(accounting))
    if last_ckpt is not None:
        console.print(f"checkpoint: {last_ckpt}")
    if export_dir is not None:
        console.print(f"export: {export_dir}")
    wall = time.perf_counter() - t0
    console.print(f"done in {wall:.1f} s")
    return wall
