"""The ``[inference.sglang]`` options and their mapping to ``sgl.Engine(**kwargs)`` (pure config; no
SGLang needed)."""

from __future__ import annotations

import json
import logging

import attrs
import pytest
from specforge_sglang_backend.backend import adapt_to_server_args
from specforge_sglang_backend.options import (
    PROTECTED,
    SglangOptions,
    engine_kwargs,
    split_extra_args,
    validate,
)

from specforge_core.config.loader import ConfigError, load_config
from specforge_core.config.schema import SpecforgeConfig

LOGGER = "specforge_sglang_backend.options"
PORTS = dict(base_gpu_id=2, node_rank=0, port=31000, nccl_port=31001, dist_init_addr="127.0.0.1:31002")

ESSENTIAL_DEFAULTS = {
    "tp_size": 8, "pp_size": 1, "nnodes": 1, "mem_fraction_static": 0.8, "context_length": None,
    "attention_backend": "flashinfer", "quantization": None, "kv_cache_dtype": None,
    "moe_runner_backend": None, "model_loader_extra_config": None, "disable_flashinfer_autotune": False,
    "enable_multimodal": False, "enable_metrics": False, "dist_init_addr": None, "dist_timeout": 20,
    "init_timeout": 300, "log_level": "warning", "log_requests": False, "log_requests_level": 0,
    "extra_args": {},
}


def cfg(target="/models/t", gpus_per_engine=8, dtype="auto", trust=False) -> SpecforgeConfig:
    c = SpecforgeConfig()
    c.model.target = target
    c.model.trust_remote_code = trust
    c.inference.backend = "sglang"
    c.inference.gpus_per_engine = gpus_per_engine
    c.inference.dtype = dtype
    return c


def test_defaults_and_every_field_has_help():
    opts = SglangOptions()
    assert {a.name: getattr(opts, a.name) for a in attrs.fields(SglangOptions)} == ESSENTIAL_DEFAULTS
    for a in attrs.fields(SglangOptions):
        assert a.metadata.get("specforge_help"), f"{a.name} has no help text"


def test_engine_kwargs_defaults():
    kw = engine_kwargs(SglangOptions(), cfg(trust=True), **PORTS)
    assert kw == {
        "model_path": "/models/t", "trust_remote_code": True, "dtype": "bfloat16",
        "mem_fraction_static": 0.8, "tp_size": 8, "pp_size": 1, "dp_size": 1, "nnodes": 1,
        "node_rank": 0, "base_gpu_id": 2, "port": 31000, "nccl_port": 31001,
        "dist_init_addr": "127.0.0.1:31002", "dist_timeout": 20,
        "disable_radix_cache": True, "chunked_prefill_size": -1, "enable_return_hidden_states": True,
        "disable_cuda_graph": True, "skip_tokenizer_init": True,
        "attention_backend": "flashinfer", "disable_flashinfer_autotune": False, "enable_multimodal": False,
        "enable_metrics": False, "log_level": "warning", "log_requests": False, "log_requests_level": 0,
    }


@pytest.mark.parametrize("dtype,want", [("auto", "bfloat16"), ("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_dtype_from_inference_section(dtype, want):
    assert engine_kwargs(SglangOptions(), cfg(dtype=dtype), **PORTS)["dtype"] == want


def test_optional_fields_are_passed_only_when_set():
    opts = SglangOptions(
        context_length=4096, quantization="fp8", kv_cache_dtype="fp8_e4m3", moe_runner_backend="triton",
        model_loader_extra_config={"enable_multithread_load": True, "num_threads": 8},
        mem_fraction_static=0.7, attention_backend="fa3", enable_metrics=True, log_requests=True,
        log_requests_level=2, dist_timeout=60,
    )
    kw = engine_kwargs(opts, cfg(), **PORTS)
    assert kw["context_length"] == 4096 and kw["quantization"] == "fp8"
    assert kw["kv_cache_dtype"] == "fp8_e4m3" and kw["moe_runner_backend"] == "triton"
    assert json.loads(kw["model_loader_extra_config"]) == {"enable_multithread_load": True, "num_threads": 8}
    assert (kw["mem_fraction_static"], kw["attention_backend"], kw["dist_timeout"]) == (0.7, "fa3", 60)
    assert (kw["enable_metrics"], kw["log_requests"], kw["log_requests_level"]) == (True, True, 2)
    unset = engine_kwargs(SglangOptions(), cfg(), **PORTS)
    for k in ("context_length", "quantization", "kv_cache_dtype", "moe_runner_backend", "model_loader_extra_config"):
        assert k not in unset


def test_extra_args_pass_through():
    opts = SglangOptions(extra_args={"watchdog_timeout": 1800, "max_prefill_tokens": 32768})
    kw = engine_kwargs(opts, cfg(), **PORTS)
    assert kw["watchdog_timeout"] == 1800 and kw["max_prefill_tokens"] == 32768


@pytest.mark.parametrize("key", sorted(PROTECTED))
def test_protected_key_dropped_with_warning_naming_it(key, caplog):
    opts = SglangOptions(extra_args={key: "user-value", "watchdog_timeout": 5})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        kw = engine_kwargs(opts, cfg(), **PORTS)
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and f"inference.sglang.extra_args.{key} " in warned[0]
    assert kw.get(key) != "user-value"
    assert kw["watchdog_timeout"] == 5


def test_each_protected_key_warned_separately(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        kept = split_extra_args({"tp_size": 2, "port": 1, "disable_radix_cache": False, "page_size": 16})
    assert kept == {"page_size": 16}
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    for key in ("tp_size", "port", "disable_radix_cache"):
        assert f"extra_args.{key} " in msgs
    assert "page_size" not in msgs


def test_essential_field_in_extra_args_is_an_error():
    with pytest.raises(ValueError, match=r"inference\.sglang\.attention_backend instead"):
        split_extra_args({"attention_backend": "triton"})


def test_tp_size_must_match_nnodes_times_gpus_per_engine():
    validate(SglangOptions(tp_size=8), cfg(gpus_per_engine=8))
    validate(SglangOptions(tp_size=16, nnodes=2), cfg(gpus_per_engine=8))
    with pytest.raises(ValueError) as e:
        validate(SglangOptions(tp_size=4), cfg(gpus_per_engine=8))
    msg = str(e.value)
    assert "inference.sglang.tp_size = 4" in msg and "inference.gpus_per_engine (8)" in msg
    assert "inference.sglang.nnodes (1)" in msg
    with pytest.raises(ValueError, match="model.target is empty"):
        validate(SglangOptions(tp_size=8), cfg(target=""))


@pytest.mark.parametrize(
    "kwargs,field",
    [({"pp_size": 2}, "pp_size"), ({"tp_size": 0}, "tp_size"), ({"mem_fraction_static": 1.5}, "mem_fraction_static"),
     ({"log_level": "loud"}, "log_level"), ({"extra_args": [1]}, "extra_args"),
     ({"model_loader_extra_config": "x"}, "model_loader_extra_config")],
)
def test_field_validators(kwargs, field):
    with pytest.raises(ValueError):
        SglangOptions(**kwargs)


# ------------------------------------------------------------------------- through the config loader
def test_toml_and_cli_extra_args(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[model]\ntarget = "/models/t"\n[inference]\nbackend = "sglang"\ngpus_per_engine = 4\n'
        '[inference.sglang]\ntp_size = 4\nmem_fraction_static = 0.75\n'
        '[inference.sglang.extra_args]\nmax_prefill_tokens = 65536\n'
    )
    c = load_config([toml], ["inference.sglang.extra_args.watchdog_timeout=1800"])
    opts = c.options("inference", "sglang")
    assert isinstance(opts, SglangOptions)
    assert opts.extra_args == {"max_prefill_tokens": 65536, "watchdog_timeout": 1800}
    kw = engine_kwargs(opts, c, **PORTS)
    assert kw["watchdog_timeout"] == 1800 and kw["max_prefill_tokens"] == 65536
    assert kw["mem_fraction_static"] == 0.75 and kw["tp_size"] == 4


def test_loader_reports_topology_mismatch(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[inference]\nbackend = "sglang"\ngpus_per_engine = 2\n[inference.sglang]\ntp_size = 4\n')
    with pytest.raises(ConfigError) as e:
        load_config([toml])
    assert "tp_size = 4" in str(e.value) and "gpus_per_engine (2)" in str(e.value)
    # The same table is not checked while another backend is selected.
    load_config([toml], ["inference.backend=hf"])


def test_loader_rejects_pp_size(tmp_path):
    with pytest.raises(ConfigError, match="pp_size"):
        load_config(overrides=["inference.backend=sglang", "inference.sglang.pp_size=2"])


# ------------------------------------------------------------------------- installed-version fitting
def test_adapt_to_server_args():
    kw = engine_kwargs(SglangOptions(), cfg(), **PORTS)
    fields = set(kw) | {"return_hidden_states_mode", "watchdog_timeout"}
    assert adapt_to_server_args(kw, fields)["return_hidden_states_mode"] == "full"
    older = set(kw) - {"disable_flashinfer_autotune"}
    assert "disable_flashinfer_autotune" not in adapt_to_server_args(kw, older)
    with pytest.raises(ValueError, match="disable_flashinfer_autotune"):
        adapt_to_server_args({**kw, "disable_flashinfer_autotune": True}, older)
    with pytest.raises(ValueError, match="no_such_arg"):
        adapt_to_server_args({**kw, "no_such_arg": 1}, set(kw))
