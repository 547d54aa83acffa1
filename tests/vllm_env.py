"""The real vLLM environment the `vllm`-marked tests run through (`nox -s vllm` builds it)."""

import pytest


def vllm_python_or_skip() -> str:
    """The vLLM venv's python; skips the calling module (or test) when there is none."""
    from specforge_vllm.eval_engine import vllm_python

    try:
        return vllm_python(None)
    except ValueError as exc:
        return pytest.skip(f"no vLLM environment: {exc}", allow_module_level=True)
