"""The ``fsdp2`` training strategy: PyTorch FSDP2 (``fully_shard``) over the trainer ranks.

What the trainer must know (see docs/fsdp2.md):
- ``prepare`` wants the module whose ``forward`` does *all* the work of one micro-step that touches
  parameters (draft TTT unroll + loss). FSDP2 all-gathers parameters in forward hooks and reduces
  gradients from hooks installed there; parameters used outside ``forward`` (e.g. reading
  ``draft.lm_head.weight`` in a loss called by the trainer) would be the sharded DTensors.
- Gradients are *summed* over ranks (``set_gradient_divide_factor(1)``): the trainer divides each
  rank's loss by the whole step's token count already (``components.TrainingStrategy``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Optional

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from specforge_core.config.fields import option
from specforge_core.plugin_api import local_rank
from specforge_fsdp2 import checkpoint as ckpt

SHARDING = ("full", "replicate")


@attrs.define
class FSDP2Options:
    sharding: str = option(
        "full",
        "'full': shard params, grads and optimizer state over all trainer ranks (ZeRO-3); "
        "'replicate': every rank holds everything, gradients all-reduced (DDP-like, FSDP2 HSDP mesh "
        "with shard size 1)",
        choices=SHARDING,
    )
    mixed_precision: bool = option(
        True,
        "bf16 parameters and compute, fp32 gradient reduction and fp32 master weights "
        "(the sharded params the optimizer updates)",
    )
    cpu_offload: bool = option(
        False, "Keep sharded params, grads and optimizer state in CPU memory (GPU only; slower)"
    )
    activation_checkpointing: bool = option(
        False, "Recompute each decoder layer's activations in backward instead of storing them"
    )

    def train_state_split(self, num_gpus: int) -> tuple[int, bool]:
        """For ``specforge plan`` (components, "planning"): 'full' shards the fp32 state over the
        trainer ranks; cpu_offload keeps it in CPU memory."""
        return (num_gpus if self.sharding == "full" else 1), self.cpu_offload


def _is_layer(name: str, module: nn.Module) -> bool:
    """A decoder layer: its own FSDP group (all-gathered just before use, freed after)."""
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    in_layer_list = parent.rsplit(".", 1)[-1] == "layers" and leaf.isdigit()
    return leaf == "midlayer" or type(module).__name__.endswith("DecoderLayer") or in_layer_list


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost decoder layers in ``model`` (a layer inside a layer is not listed again)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if module is model or not _is_layer(name, module):
            continue
        if any(name.startswith(prev + ".") for prev, _ in found):
            continue
        found.append((name, module))
    return found


def _checkpoint_forward(module: nn.Module) -> None:
    """Activation checkpointing without renaming parameters (a wrapper module would add a prefix
    to every state-dict key): recompute ``module.forward`` in backward."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


class FSDP2Strategy:
    """``TrainingStrategy`` over the default process group (already initialised by the caller)."""

    wraps_step = True  # prepare() gets the trainer's DraftStep (forward = one whole micro-step)

    def __init__(self, options: Optional[FSDP2Options] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "training.strategy = 'fsdp2' needs torch.distributed initialised first "
                "(specforge_core.distributed.init_process_group)"
            )
        self.options = options or FSDP2Options()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank(self.rank))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.options.cpu_offload and self.device.type != "cuda":
            raise ValueError("[training.fsdp2] cpu_offload = true needs a GPU; on CPU the params already live in CPU memory")
        self.mesh = self._make_mesh()

    def _make_mesh(self) -> DeviceMesh:
        kind = self.device.type
        if self.options.sharding == "full":
            return init_device_mesh(kind, (self.world_size,), mesh_dim_names=("shard",))
        # HSDP with a shard dimension of 1: params Replicate() over ranks, gradients all-reduced.
        return init_device_mesh(kind, (self.world_size, 1), mesh_dim_names=("replicate", "shard"))

    # ------------------------------------------------------------------------------- wrapping
    def prepare(self, model: nn.Module) -> nn.Module:
        opts = self.options
        if not _has_forward(model):
            raise TypeError(
                f"fsdp2: prepare() got a {type(model).__name__}, which has no forward(). FSDP2 gathers "
                "parameters and reduces gradients from forward hooks, so it needs the module whose "
                "forward() runs one whole micro-step that touches parameters (draft TTT unroll + loss, "
                "reading lm_head inside forward); see docs/fsdp2.md"
            )
        if opts.mixed_precision:
            model = model.float()  # the sharded fp32 params are the optimizer's master weights
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        offload: OffloadPolicy = CPUOffloadPolicy() if opts.cpu_offload else OffloadPolicy()
        if not opts.cpu_offload:
            model = model.to(self.device)
        kwargs = dict(mesh=self.mesh, mp_policy=mp, offload_policy=offload)
        for name, layer in find_layers(model):
            # FSDP2 gathers a group's params in its module's forward hooks, so a layer gets its own
            # group only if it is run through ``forward``. The EAGLE-3 draft's midlayer is driven
            # through other methods (attn_input/finish): it stays in the root group.
            if not _has_forward(layer):
                if opts.activation_checkpointing:
                    raise ValueError(
                        f"[training.fsdp2] activation_checkpointing: layer {name!r} "
                        f"({type(layer).__name__}) has no forward() to recompute; set it to false"
                    )
                continue
            if opts.activation_checkpointing:
                _checkpoint_forward(layer)
            fully_shard(layer, reshard_after_forward=True, **kwargs)
        # Root group: everything else (fc, norm, lm_head and the frozen target embedding; FSDP2
        # reduces gradients only for params that require them). Kept unsharded from forward to
        # backward: it is needed again first thing in backward.
        fully_shard(model, reshard_after_forward=False, **kwargs)
        # sum, not mean, over ranks: every rank's loss is already its share of the global objective
        # (plain SUM collectives: gloo has no PREMUL_SUM)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Accumulation micro-steps: gradients stay local (unsharded) until a step outside this."""
        assert isinstance(model, FSDPModule), "no_sync needs the module returned by prepare()"
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the global gradient norm (all shards, all ranks); returns the norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # sum of squares over the shards -> one replicated scalar
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    # --------------------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone().to(self.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    # --------------------------------------------------------------------------- state
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Gathered trainable params + buffers as CPU tensors on rank 0 ({} elsewhere). The frozen
        target embedding is left out (it is the target's, not trained). Collective: call on all ranks."""
        return ckpt.full_model_state(model)

    def save_checkpoint(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> None:
        ckpt.save(path, model, optimizer, extra, barrier=self.barrier)

    def load_checkpoint(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return ckpt.load(path, model, optimizer, barrier=self.barrier)


def make_fsdp2(options: Optional[FSDP2Options], config: Any = None) -> FSDP2Strategy:
    """Factory registered as ``fsdp2``: ``(options, config: SpecforgeConfig) -> strategy``."""
    return FSDP2Strategy(options)


make_fsdp2.needs_process_group = True  # even on one rank (components.TrainingStrategy)
