"""The ``vllm`` target backend without vLLM: its options, config checks, plan notes and discovery.

The backend against the real engine is in test_vllm_backend_engine.py (marked ``vllm``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from specforge_core.config import load_config
from specforge_core.config.loader import ConfigError

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.toml"


def _cfg(*overrides: str):
    return load_config([QUICKSTART], ["inference.backend=vllm", *overrides])


def test_registered_with_its_options():
    cfg = _cfg("inference.vllm.cpu_kvcache_space_gib=2", "inference.vllm.extra_args.max_num_seqs=64")
    opts = cfg.options("inference", "vllm")
    assert type(opts).__name__ == "VLLMBackendOptions"
    assert opts.cpu_kvcache_space_gib == 2 and opts.extra_args == {"max_num_seqs": 64}


def test_tp_size_must_equal_gpus_per_engine():
    with pytest.raises(ConfigError, match="tensor_parallel_size = 1 must equal inference.gpus_per_engine = 2"):
        _cfg("inference.gpus_per_engine=2")
    cfg = _cfg("inference.gpus_per_engine=2", "inference.vllm.tensor_parallel_size=2")
    assert cfg.options("inference", "vllm").tensor_parallel_size == 2


def test_max_model_len_must_leave_room_for_the_sampled_token():
    with pytest.raises(ConfigError, match="max_model_len = 2048 must exceed dataset.max_seq_length = 2048"):
        _cfg("inference.vllm.max_model_len=2048")
    _cfg("inference.vllm.max_model_len=2049")


def test_protected_extra_args_are_dropped(caplog):
    from specforge_vllm.options import split_extra_args

    kept = split_extra_args({"max_num_seqs": 8, "enable_prefix_caching": True, "speculative_config": {}})
    assert kept == {"max_num_seqs": 8}
    assert "enable_prefix_caching" in caplog.text and "speculative_config" in caplog.text


def test_plan_shows_engine_and_cache_figures():
    from specforge_core import plan as P

    cfg = _cfg("run.gpus_per_node=8", "run.gpu_memory_gib=80", "inference.num_gpus=4",
               "inference.gpus_per_engine=2", "inference.vllm.tensor_parallel_size=2")
    plan = P.build_plan(cfg)
    assert P.engine_shape(cfg) == (1, 2, 2)
    t, n_aux = plan["target"], plan["n_aux"]
    # per token: the target's KV on one TP rank + the captured states ((n_aux + 1) x H, bf16)
    kv = P.kv_bytes_per_token(t, 2, 2)
    assert plan["vllm"]["cache_bytes_per_token"] == kv + (n_aux + 1) * t["hidden_size"] * 2
    assert plan["vllm"]["max_model_len"] == cfg.dataset.max_seq_length + 1
    text = P.format_plan(cfg, plan, [])
    assert "engine 0 (TP ranks 0-1)" in text and "vllm cache:" in text


def test_validate_reports_a_cache_too_small_for_one_sample():
    from specforge_core.checks import check_config

    cfg = _cfg("inference.vllm.cpu_kvcache_space_gib=0.001")
    problems = [p for p in check_config(cfg) if p.level == "error"]
    assert any("cpu_kvcache_space_gib" in str(p) and "cannot hold one sample" in str(p) for p in problems)
    ok = _cfg()
    assert not [p for p in check_config(ok) if p.level == "error" and "vllm" in str(p)]


def test_find_python_names_the_bad_setting(tmp_path, monkeypatch):
    from specforge_vllm.backend import find_python

    with pytest.raises(FileNotFoundError, match="inference.vllm.python = .*not an executable"):
        find_python(str(tmp_path / "nope" / "python"))
    monkeypatch.setenv("SPECFORGE_VLLM_PYTHON", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"\$SPECFORGE_VLLM_PYTHON"):
        find_python("")
    monkeypatch.setenv("SPECFORGE_VLLM_PYTHON", sys.executable)
    assert find_python("") == sys.executable
    assert os.path.samefile(find_python(sys.executable), sys.executable)


def test_resolve_dtype_follows_hf():
    from specforge_vllm.backend import resolve_dtype

    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("fp16", "cpu") == "float16"
