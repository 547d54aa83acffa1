"""Export a trained draft in the layout its serving engines load.

What is written is the draft algorithm's (``DraftAlgorithm.export``: a config.json dict and the
tensors, e.g. llama-eagle3's ``fc.weight``, ``midlayer.*``, ``d2t``/``t2d`` for SGLang and vLLM); this
module writes ``<out_dir>/config.json`` and ``<out_dir>/model.safetensors`` *atomically* (a temp dir,
then renamed), so a half-written export never exists.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from specforge_core.build import algorithm as build_algorithm
from specforge_core.run.vocab import vocab_mapping_path
from specforge_core.target import target_info, with_aux_layers
from specforge_core.training import checkpoint as ckpt
from specforge_core.vocab import VocabMapping


def _host() -> str:
    import socket

    return socket.gethostname().replace(".", "_")  # '.' ends the owner part of a temp dir's name


def _owner() -> str:
    return f"{os.getpid()}@{_host()}"


def sweep_dead_temps(out: Path) -> list[str]:
    """Remove ``.<name>.tmp-<pid>@<host>.*`` / ``.old-`` dirs next to ``out`` left by an export
    that was killed (its pid on this host is gone); a live or other-host writer's are kept."""
    import re

    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)@(.+?)\.")
    removed = []
    for entry in out.parent.iterdir() if out.parent.is_dir() else ():
        m = pattern.match(entry.name)
        if not m or m.group(2) != _host():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its writer is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(str(entry))
    return removed


def write_export(config: dict[str, Any], state: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` to ``out_dir`` atomically; returns it."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    removed = sweep_dead_temps(out)
    if removed:
        warnings.warn(f"export: removed {len(removed)} temp dir(s) of exports that were killed: "
                      f"{', '.join(removed)}", stacklevel=2)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_owner()}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            # Swap: move the old export aside first so `out` is never partially written.
            old = out.parent / f".{out.name}.old-{_owner()}."
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


ALGORITHM_ATTR = "specforge_algorithm"  # the trainer tags the draft it builds with its algorithm


def export_draft(draft: Any, vocab: Any, out_dir: str | Path, algorithm: Any = None) -> Path:
    """Export ``draft`` to ``out_dir`` with ``algorithm``'s layout (default: the algorithm the
    trainer built it with, ``draft.specforge_algorithm``)."""
    algorithm = algorithm if algorithm is not None else getattr(draft, ALGORITHM_ATTR, None)
    if algorithm is None:
        raise ValueError(f"export: no draft algorithm given for a {type(draft).__name__} (pass algorithm=)")
    config, state = algorithm.export(draft, vocab)
    return write_export(config, state, out_dir)


def export_from_checkpoint(
    config: Any,  # SpecforgeConfig
    checkpoint_dir: Optional[str | Path] = None,
    out_dir: Optional[str | Path] = None,
    registry: Any = None,
) -> Path:
    """``specforge export``: load a training checkpoint (default: the newest complete one in
    ``config.output_dir``) and export it (default: ``<output_dir>/export``)."""
    if checkpoint_dir is None:
        checkpoint_dir = ckpt.latest_checkpoint(config.output_dir, ignore=ckpt.OPTIMIZER_FILES)
        if checkpoint_dir is None:
            raise FileNotFoundError(
                f"export: no complete checkpoint under {ckpt.checkpoint_root(config.output_dir)}"
            )
    checkpoint_dir = Path(checkpoint_dir)
    bad = ckpt.problems(checkpoint_dir, ignore=ckpt.OPTIMIZER_FILES)  # export reads no optimizer state
    if bad:
        raise FileNotFoundError(f"export: {checkpoint_dir} is not a complete checkpoint ({'; '.join(bad)})")
    extra = ckpt.read_extra(checkpoint_dir)  # data only: a checkpoint that holds code is refused here
    out_dir = Path(out_dir) if out_dir is not None else Path(config.output_dir) / "export"

    config = with_aux_layers(config, registry)  # unset: the draft algorithm's default, as in training
    info = target_info(config.model.target, config.model.aux_layers, config.model.trust_remote_code)
    # The mapping the weights were trained with travels in the checkpoint; the run dir's file may
    # have been rewritten since (`specforge vocab`). Checkpoints older than that: the run dir's file.
    vocab = ckpt.checkpoint_vocab(extra)
    run_vocab = vocab_mapping_path(config)
    if vocab is None:
        vocab = VocabMapping.load(run_vocab)
    elif run_vocab.exists() and not torch.equal(VocabMapping.load(run_vocab).d2t, vocab.d2t):
        print(f"export: {run_vocab} differs from the mapping {checkpoint_dir.name} was trained with; "
              "exporting the trained one (from the checkpoint)")
    algorithm = build_algorithm(config, registry)
    draft = algorithm.build(info, vocab)
    if (checkpoint_dir / ".metadata").exists():
        # A sharded (DCP) checkpoint, e.g. from fsdp2 on N ranks: read it in this one process,
        # no process group needed.
        _load_dcp_trainables(checkpoint_dir, draft)
    else:  # model.safetensors: the trainable weights (frozen ones came from the target in build)
        ckpt.load_model_weights(draft, str(checkpoint_dir / "model.safetensors"))
    return export_draft(draft, vocab, out_dir, algorithm)


def _load_dcp_trainables(path: Path, draft: torch.nn.Module) -> None:
    """Fill the draft's trainable parameters from a DCP checkpoint's ``model`` entry, reading data
    only (nothing in the checkpoint is unpickled as code)."""
    from specforge_core.training.safe_dcp import load_trainables

    load_trainables(path, draft)
