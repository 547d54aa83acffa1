"""Resume across the change to absolute paths: a checkpoint written when config paths were stored as
given (relative to the working directory) must not be refused when the same files are now named by
absolute paths; a really different file still is."""

from __future__ import annotations

import os

from specforge_core.rundir import config_changes

OLD = '[dataset]\npath = ["data/train.jsonl"]\ncache_dir = "cache"\n[model]\ntarget = "tiny-target"\n'


def _new(path: str, target: str) -> str:
    return f'[dataset]\npath = ["{path}"]\ncache_dir = "{os.path.abspath("cache")}"\n[model]\ntarget = "{target}"\n'


def test_old_relative_paths_equal_the_same_absolute_ones():
    refused, allowed = config_changes(OLD, _new(os.path.abspath("data/train.jsonl"), os.path.abspath("tiny-target")))
    assert refused == [] and allowed == []


def test_a_different_file_is_still_refused():
    refused, _ = config_changes(OLD, _new("/elsewhere/train.jsonl", os.path.abspath("tiny-target")))
    assert refused == ["dataset.path: ['data/train.jsonl'] -> ['/elsewhere/train.jsonl']"]
    refused, _ = config_changes(OLD, _new(os.path.abspath("data/train.jsonl"), "other-hub/model"))
    assert refused and refused[0].startswith("model.target")
