"""A 2-layer llama-eagle3 draft under the fsdp2 strategy on real gloo groups (2 CPU ranks): its
later layer is a decoder layer with a forward (its own FSDP group, gathered per TTT step), and the
result equals one process training on the whole batch. Reuses test_fsdp2_strategy's harness."""

from __future__ import annotations

import os
import traceback

import attrs
import test_fsdp2_strategy as base
import torch
import torch.multiprocessing as mp

from specforge_core.distributed import destroy, free_port, init_process_group


class TwoLayerStep(base.Eagle3Step):
    def __init__(self) -> None:
        super().__init__()
        from specforge_llama_eagle3.model import LlamaEagle3Draft

        self.draft = LlamaEagle3Draft(attrs.evolve(self.draft.config, num_hidden_layers=2))


def new_two_layer() -> TwoLayerStep:
    torch.manual_seed(0)
    return TwoLayerStep()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    try:
        init_process_group("gloo", rank, world, "127.0.0.1", port)
        s = base._strategy()
        model = s.prepare(new_two_layer())
        groups = [name for name, m in model.named_modules() if type(m).__name__.startswith("FSDP")]
        opt = base.optimizer(model)
        base.train(model, opt, range(base.STEPS), rank, world, strategy=s)
        torch.save({"state": s.full_state_dict(model), "groups": groups}, os.path.join(out, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        destroy()


def test_two_layer_draft_two_ranks_equal_single_process(tmp_path):
    out = str(tmp_path)
    try:  # fork: the children inherit the imported torch
        mp.start_processes(_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="fork")
    except Exception as e:
        errors = [open(os.path.join(out, f)).read() for f in os.listdir(out) if f.startswith("error-")]
        raise AssertionError(f"workers failed: {e}\n" + "\n".join(errors)) from None
    r0 = torch.load(os.path.join(out, "rank0.pt"), weights_only=False)
    want, _ = base.reference(range(base.STEPS), build=new_two_layer)
    assert any(k.startswith("draft.layers.1.") for k in want)
    base.assert_same(r0["state"], want)
    assert "draft.layers.1" in r0["groups"] and "draft.midlayer" in r0["groups"]
