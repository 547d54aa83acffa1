"""DSpark and the real vLLM CPU build (its own venv): vLLM 0.32 implements ``dspark`` only in its V2
GPU model runner, so the CPU build refuses it at config time, by both runners. This pins that fact
(docs/dspark.md): when a vLLM CPU build serves dspark, this test fails and the per-prompt equality
test of test_dflash_vllm.py is the one to write for dspark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_env import vllm_python_or_skip  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "configs" / "assets" / "tiny-target"


pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PYTHON = vllm_python_or_skip()

RUNNER = r'''
import sys
from vllm import LLM
LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True,
    speculative_config={"method": "dspark", "model": sys.argv[2], "num_speculative_tokens": 3})
'''


def _dspark_export(tmp_path: Path) -> Path:
    from specforge_dspark.plugin import DSparkOptions, make_dspark

    from specforge_core.export import write_export
    from specforge_core.training.frozen import TargetWeights
    from specforge_core.types import TargetInfo
    from specforge_core.vocab import VocabMapping

    hf = json.loads((TINY / "config.json").read_text())
    vocab = VocabMapping.from_target_ids(torch.arange(hf["vocab_size"]), hf["vocab_size"])
    info = TargetInfo(model_path=str(TINY), hf_config=hf, aux_layer_ids=[2, 4, 5], hidden_size=hf["hidden_size"],
                      vocab_size=hf["vocab_size"], num_hidden_layers=hf["num_hidden_layers"])
    alg = make_dspark(DSparkOptions(block_size=3, num_layers=2, markov_rank=16))
    torch.manual_seed(0)
    draft = alg.build(info, vocab, TargetWeights(str(TINY), vocab))
    config, tensors = alg.export(draft, vocab)
    return write_export(config, tensors, tmp_path / "export")


@pytest.mark.parametrize("v2,reason", [("0", "Model Runner V1 does not support: dspark speculative decoding"),
                                       ("1", "Model Runner V2 requires Triton")])
def test_vllm_cpu_refuses_dspark(tmp_path, v2, reason):
    export = _dspark_export(tmp_path)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_USE_V2_MODEL_RUNNER": v2}
    proc = subprocess.run([PYTHON, str(tmp_path / "runner.py"), str(TINY), str(export)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and reason in proc.stderr, proc.stderr[-3000:]
