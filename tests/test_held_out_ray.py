"""The held-out estimate during training (``training.eval_every``) on the Ray pipeline: one config
through the local pipeline and through Ray (real Ray on loopback, two fsdp2 trainer ranks over
gloo, the tiny in-process HF target in an engine actor) logs the same ``held_out/<metric>`` values
at the same steps, within the both-pipelines comparison's tolerance (tests/test_run_pipelines.py);
the held-out samples never reach a training step on Ray; the closing sample count adds up.

What each process trained and evaluated is recorded by a spy: in this process by monkeypatch,
in every Ray worker by Ray's ``worker_process_setup_hook`` (the same two functions), so the
assertions look at the token ids of every batch the trainer ranks really trained on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from test_run_pipelines import QUICKSTART, TARGET, assert_same_records, config, run  # noqa: E402

from specforge_core.run import held_out  # noqa: E402
from specforge_core.run.held_out import PREFIX  # noqa: E402
from specforge_core.training.trainer import Trainer  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not (TARGET / "model.safetensors").is_file(), reason="tiny target has no weights")]

SPY_ENV = "SPECFORGE_TEST_HELD_OUT_SPY"


def _spies(out: str):
    """``Trainer.train_step`` and ``held_out_metrics`` that append the token ids of what they got
    (one JSON line per sample) to ``<out>/<pid>.jsonl`` and then do their work."""
    step, metrics = Trainer.train_step, held_out.held_out_metrics

    def write(kind: str, rows: list[list[int]], **extra) -> None:
        with open(os.path.join(out, f"{os.getpid()}.jsonl"), "a") as f:
            for ids in rows:
                f.write(json.dumps({"kind": kind, "ids": ids, **extra}) + "\n")

    def spy_step(self, micro):
        batches = self._assemble(micro)  # lists of features (local) or batches staged by the Ray feed
        write("train", [b.input_ids[i][b.attention_mask[i]].tolist() for b in batches
                        for i in range(b.input_ids.shape[0])])
        return step(self, batches)

    def spy_metrics(trainer, feats, micro_batch_size, counted=True):
        write("held", [f.input_ids.tolist() for f in feats], counted=counted, step=trainer.step)
        return metrics(trainer, feats, micro_batch_size, counted)

    return spy_step, spy_metrics


def _install_spies() -> None:
    """Ray's worker_process_setup_hook: every worker process records into $SPECFORGE_TEST_HELD_OUT_SPY."""
    from specforge_core.run import held_out as module
    from specforge_core.training.trainer import Trainer as cls

    spy_step, spy_metrics = _spies(os.environ[SPY_ENV])
    cls.train_step = spy_step
    module.held_out_metrics = spy_metrics


def _read(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob("*.jsonl")) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def ray_spy(tmp_path_factory):
    from ray import cloudpickle

    out = tmp_path_factory.mktemp("ray-spy")
    os.environ["WANDB_MODE"] = "offline"
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(num_cpus=4, object_store_memory=150_000_000, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {SPY_ENV: str(out)}, "worker_process_setup_hook": _install_spies})
    yield out
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def held_out_metrics(history: list[dict[str, float]]) -> dict[int, dict[str, float]]:
    return {int(m["step"]): {k: v for k, v in m.items() if k.startswith(PREFIX)}
            for m in history if any(k.startswith(PREFIX) for k in m)}


def test_held_out_estimate_on_ray_equals_local(tmp_path, monkeypatch, ray_spy):
    assert QUICKSTART.is_file()
    # 13 samples, 5 held out (ranks' shares 3 and 2: the second rank repeats a forward, uncounted),
    # 8 trained: 4 per step, 2 epochs -> 4 steps; estimates at steps 2 and 4
    extra = ("dataset.max_samples=13", "training.eval_every=2", "training.eval_samples=5")
    local_spy = tmp_path / "local-spy"
    local_spy.mkdir()
    spy_step, spy_metrics = _spies(str(local_spy))
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", spy_step)
        m.setattr(held_out, "held_out_metrics", spy_metrics)
        local, local_text = run(config(tmp_path / "local", "local", *extra))
    ray_res, ray_text = run(config(tmp_path / "ray", "ray", *extra))

    # the same observer records (loss, grad norm, lr per step; the console's lines), and the
    # held-out metrics at the same steps, equal within the comparison's tolerance
    assert local.steps == 4
    assert_same_records(local, ray_res, local_text, ray_text)
    want, got = held_out_metrics(local.history), held_out_metrics(ray_res.history)
    assert sorted(want) == sorted(got) == [2, 4]
    for step in want:
        assert sorted(got[step]) == sorted(want[step]) and f"{PREFIX}accept_len" in want[step]
        torch.testing.assert_close(torch.tensor([got[step][k] for k in sorted(want[step])], dtype=torch.float64),
                                   torch.tensor([want[step][k] for k in sorted(want[step])], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5)
    assert want[4][f"{PREFIX}accept_len"] != want[2][f"{PREFIX}accept_len"]  # the draft moved in between
    # the driver's console printed the held-out line of each estimate, as the local run did
    for text in (local_text, ray_text):
        lines = [x for x in text.splitlines() if x.startswith("held-out step ")]
        assert len(lines) == 2 and "since step 2)" in lines[1] and lines[0].endswith("| 5 samples never trained on")

    # what was really trained and evaluated: token ids of every row
    ids = lambda rows: sorted(tuple(r["ids"]) for r in rows)  # noqa: E731
    loc, ray_rows = _read(local_spy), _read(ray_spy)
    loc_train = ids(r for r in loc if r["kind"] == "train")
    loc_held = ids(r for r in loc if r["kind"] == "held" and r["step"] == 2)
    ray_train = ids(r for r in ray_rows if r["kind"] == "train")
    ray_held = ids(r for r in ray_rows if r["kind"] == "held" and r["counted"] and r["step"] == 2)
    assert len(loc_held) == len(set(loc_held)) == 5 and len(loc_train) == 16  # 8 samples x 2 epochs
    assert ray_train == loc_train  # the same samples, each epoch
    assert ray_held == loc_held  # the two ranks' shares together: the held-out set, once each
    assert not set(ray_train) & set(ray_held)  # never trained on
    # each estimate on every rank (2 ranks x 2 estimates), and nothing else evaluated
    assert sorted((r["step"], r["counted"]) for r in ray_rows if r["kind"] == "held") == [(2, True)] * 5 + [(4, True)] * 5

    # the closing sample count adds up: trained + skipped (held out counted once) = records read
    acc = ray_res.accounting
    assert acc == local.accounting
    assert acc["skipped: held out for evaluation (training.eval_every)"] == 5 and acc["trained"] == 8
    assert acc["records_in"] == acc["trained"] + sum(v for k, v in acc.items() if k.startswith("skipped: "))
    assert ray_res.controller["trained"] == 16  # the controller's stream never saw the held-out samples


def test_one_held_out_sample_from_the_feature_cache_with_the_greedy_chain(tmp_path, ray_spy):
    """Fewer held-out samples than trainer ranks (rank 1 takes part with a stand-in copy, uncounted),
    features read from the disk cache (no engine runs), and the greedy chain on rank 0: the same
    held-out metrics, chain tau included, as the local run of the same config."""
    from specforge_core.data.features import write_features

    disk = ["transfer.store=disk", f"transfer.disk.dir={tmp_path / 'cache'}", "inference.dtype=fp32"]
    write_features(config(tmp_path / "write", "local", *disk))
    extra = (*disk, "training.eval_every=3", "training.eval_samples=1", "training.eval_chain_prompts=1",
             "eval.steps=3", "eval.max_new_tokens=8")
    before = len(_read(ray_spy))
    local, local_text = run(config(tmp_path / "local", "local", *extra))
    ray_res, ray_text = run(config(tmp_path / "ray", "ray", *extra))
    assert "features from the cache (no inference)" in ray_text
    assert_same_records(local, ray_res, local_text, ray_text)
    want, got = held_out_metrics(local.history), held_out_metrics(ray_res.history)
    assert sorted(want) == sorted(got) and f"{PREFIX}chain_accept_len" in want[max(want)]
    for step in want:
        assert sorted(got[step]) == sorted(want[step])
        for k, v in want[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (step, k)
    held = [r for r in _read(ray_spy)[before:] if r["kind"] == "held"]
    assert sorted(r["counted"] for r in held) == sorted([False, True] * len(want))  # a real share, a stand-in
    assert ray_res.accounting == local.accounting
    assert ray_res.accounting["skipped: held out for evaluation (training.eval_every)"] == 1


def test_ray_run_stopped_before_its_first_estimate_resumes_to_the_same_estimates(tmp_path, ray_spy):
    """A Ray run stopped after step 1 (its held-out features made, never read: the driver deletes
    them) and resumed from its checkpoint logs the uninterrupted local run's estimates."""
    import io

    from rich.console import Console

    from specforge_core.pipeline import run_pipeline

    extra = ("dataset.max_samples=13", "training.eval_every=2", "training.eval_samples=5", "training.save_every=1")
    local, _ = run(config(tmp_path / "local", "local", *extra))
    quiet = Console(file=io.StringIO(), width=200)
    first = run_pipeline(config(tmp_path / "ray", "ray", *extra), console=quiet, stop_after_steps=1)
    assert first.steps == 1 and not held_out_metrics(first.history) and first.export_dir is None
    resumed, text = run(config(tmp_path / "ray", "ray", *extra, "training.resume=true"))
    assert [int(m["step"]) for m in resumed.history] == [2, 3, 4]
    want, got = held_out_metrics(local.history), held_out_metrics(resumed.history)
    assert sorted(got) == sorted(want) == [2, 4]
    for step in want:
        for k, v in want[step].items():
            assert got[step][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (step, k)
    assert resumed.accounting == local.accounting
