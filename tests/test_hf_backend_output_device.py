"""Where the hf backend leaves captured features: on the target's device only when producer and
trainer share one process; in host memory whenever a transfer store crosses processes."""

from specforge_hf_backend.backend import resolve_output_device

from specforge_core.config import load_config


def test_auto_keeps_features_on_device_only_for_the_one_process_path():
    local = load_config(overrides=["run.pipeline='local'", "transfer.store='local'"])
    shm = load_config(overrides=["run.pipeline='local'", "transfer.store='shm'"])
    ray = load_config(overrides=["run.pipeline='ray'", "transfer.store='local'"])
    assert resolve_output_device("auto", local) == "same"
    assert resolve_output_device("auto", shm) == "cpu"
    assert resolve_output_device("auto", ray) == "cpu"
    assert resolve_output_device("cpu", local) == "cpu"  # an explicit choice wins
    assert load_config().options("inference", "hf").output_device == "auto"
