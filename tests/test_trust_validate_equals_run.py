"""`specforge config validate` and `specforge run` run one list of checks (checks.py): for each bad
config below, both exit 2 with one line naming the key or file, and run stops before any work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from specforge_core import cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.toml")
TINY = ROOT / "configs" / "assets" / "tiny-target"


def _target_without_weights(tmp: Path) -> Path:
    dst = tmp / "no-weights"
    shutil.copytree(TINY, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def _target_with_bad_config(tmp: Path) -> Path:
    dst = tmp / "bad-config"
    shutil.copytree(TINY, dst)
    (dst / "config.json").write_text('{"num_hidden_layers": 8, "hidden_size": ')  # cut off
    return dst


def _empty_data(tmp: Path) -> Path:
    f = tmp / "empty.jsonl"
    f.write_text("\n\n")
    return f


# case -> (overrides, what the one error line says); {tmp} and the helpers fill in paths
CASES = {
    "lr-nan": (["training.lr=nan"], "training.lr: nan is not a finite number"),
    "empty-dataset": (["dataset.path=['{empty}']"], "empty.jsonl: no records"),
    "target-without-weights": (["model.target={no_weights}"], "no-weights: no weights"),
    "invalid-target-config": (["model.target={bad_config}"], "config.json: line 1: not valid JSON"),
    "feature-cache-missing": (["transfer.store=disk", "transfer.disk.dir={tmp}/no-cache"],
                              "no-cache: no index.json"),
    # the Ray pipeline reads the cache too: its checks are the same
    "ray-feature-cache-missing": (["run.pipeline=ray", "transfer.store=disk", "transfer.disk.dir={tmp}/no-cache"],
                                  "no-cache: no index.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validate_and_run_refuse_alike_before_any_work(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    fill = {"tmp": tmp_path, "empty": _empty_data(tmp_path) if case == "empty-dataset" else "",
            "no_weights": _target_without_weights(tmp_path) if case == "target-without-weights" else "",
            "bad_config": _target_with_bad_config(tmp_path) if case == "invalid-target-config" else ""}
    overrides, expected = CASES[case]
    args = [QUICKSTART, f"run.output_dir={tmp_path / 'out'}", f"dataset.cache_dir={tmp_path / 'tok'}",
            *[o.format(**fill) for o in overrides]]
    for argv in (["config", "validate", *args], ["run", *args]):
        code = cli.main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (argv[0], code, err)
        assert "Traceback" not in err
        assert not (tmp_path / "out").exists() and not (tmp_path / "tok").exists()  # no work started


def test_ray_with_the_disk_store_is_accepted_by_both(tmp_path, capsys, monkeypatch):
    """`run.pipeline = "ray"` with a complete disk cache: validate accepts it, and so does the check
    list `run` runs first (was refused only after Ray started, by a RayTaskError). The Ray run itself
    trains from the cache in tests/test_run_pipelines.py."""
    from specforge_core.checks import check_config
    from specforge_core.config import load_config
    from specforge_core.data.features import write_features

    monkeypatch.chdir(ROOT)
    args = [f"run.output_dir={tmp_path / 'out'}", f"dataset.cache_dir={tmp_path / 'tok'}", "dataset.max_samples=8",
            "transfer.store=disk", f"transfer.disk.dir={tmp_path / 'cache'}", "logging.progress=false"]
    write_features(load_config([QUICKSTART], overrides=args))
    ray = [*args, "run.pipeline=ray"]
    assert cli.main(["config", "validate", QUICKSTART, *ray]) == 0, capsys.readouterr().err
    assert [p for p in check_config(load_config([QUICKSTART], overrides=ray)) if p.level == "error"] == []


def test_data_with_nothing_to_learn_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """What only tokenizing can tell (here: every reply cut off by max_seq_length) is still the
    user's input: one line naming dataset.path and the counts, exit 2, no traceback."""
    monkeypatch.chdir(ROOT)
    code = cli.main(["run", QUICKSTART, f"run.output_dir={tmp_path / 'out'}", f"dataset.cache_dir={tmp_path / 'tok'}",
                     "dataset.max_seq_length=8", "dataset.max_samples=4", "logging.progress=false"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1 and "no sample has anything to learn" in lines[0], err
    assert "empty after truncation" in lines[0] and "Traceback" not in err
