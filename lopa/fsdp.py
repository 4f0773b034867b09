"""FSDP2 (``torch.distributed.fsdp.fully_shard``): reach into a sharded model outside its own forward.

Between forwards, FSDP2 keeps each group's parameters as dim-0 ``DTensor`` shards; its
pre-forward hook all-gathers them just before the module that owns them runs.  A prompted
model reads the embedding table (token rows of the assembled input) and may run a
submodule of the base (the backbone as LoPA's encoder or for a shared prefix's keys and
values) where no such hook fires.  :func:`unshard_path` all-gathers exactly the groups a
read or call needs -- the same all-gather the module's own pre-forward would do, only
earlier, so nothing is gathered twice -- and FSDP reshards them as usual (after their
forward, or after backward for a root).

The prompt is not sharded (a few kB): :func:`replicate_across_shards` keeps it the same on
every process and averages its gradients, as DDP would, so a sharded base needs no wrapper.

Without an initialised process group everything here is a no-op that costs one check.
"""
from __future__ import annotations

from typing import List

import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["readable_weight", "replicate_across_shards", "sharded_parameter_names", "unshard_path"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _fsdp_module_type():
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def _is_dtensor(t) -> bool:
    if not _distributed():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _path(model: nn.Module, target: nn.Module) -> List[nn.Module]:
    """The modules from ``model`` down to ``target`` (both included); empty when ``target`` is not inside."""
    for name, module in model.named_modules(remove_duplicate=False):
        if module is target:
            path, current = [model], model
            for part in name.split(".") if name else ():
                current = current._modules[part]
                path.append(current)
            return path
    return []


def unshard_path(model: nn.Module, target: nn.Module) -> None:
    """All-gather the FSDP2 groups of ``target`` and of its ancestors inside ``model``, so that
    ``target``'s weights can be read, or ``target`` run, outside ``model``'s forward."""
    if not _distributed():
        return
    fsdp_module = _fsdp_module_type()
    owners = [m for m in _path(model, target) if isinstance(m, fsdp_module)]
    if owners:
        _settle_root(owners[0])
    for module in owners:
        module.unshard()


def _settle_root(module: nn.Module) -> None:
    """Make the outermost sharded module FSDP's root before any module inside it runs.

    FSDP2 takes the first sharded module to run forward as the root; a decoder layer run
    first (LoPA's encoder, a shared prefix's backbone) would claim it, and the real root's
    first forward would then fail.  FSDP2 has no public call for this; its own first
    forward runs the same initialisation.
    """
    state = module._get_fsdp_state()
    if getattr(state, "_is_root", True) is None and len(getattr(state, "_modules", ())) == 1:
        state._lazy_init()


def readable_weight(model: nn.Module, module: nn.Module, what: str = "the input embedding table") -> Tensor:
    """``module.weight`` as a plain tensor that kernels may read: unsharded first when FSDP2
    shards it (``module`` inside ``model``)."""
    weight = module.weight
    if not _is_dtensor(weight):
        return weight
    unshard_path(model, module)
    weight = module.weight
    if _is_dtensor(weight):
        raise TypeError(
            f"{what} is a DTensor ({weight.placements}) that FSDP2 does not manage from this model (tensor "
            "parallelism?): the prompt assembly needs the whole table on every rank; shard the model with "
            "torch.distributed.fsdp.fully_shard, or replicate the embedding"
        )
    return weight


def sharded_parameter_names(module: nn.Module) -> List[str]:
    """Names of ``module``'s parameters that are DTensors (sharded by FSDP2): what data-parallel
    replication of the rest (DDP over the prompt) must leave alone."""
    if not _distributed():
        return []
    return [name for name, p in module.named_parameters() if _is_dtensor(p)]


def _has_fsdp(model: nn.Module) -> bool:
    fsdp_module = _fsdp_module_type()
    return any(isinstance(m, fsdp_module) for m in model.modules())


def replicate_across_shards(model: nn.Module, replicated: nn.Module, name: str = "prompt") -> bool:
    """When FSDP2 shards ``model``, keep ``replicated`` (``model.<name>``, a part FSDP leaves alone)
    the same on every process, as DDP would: broadcast it from rank 0 once, then average its
    gradients over all processes after every backward.  Returns whether ``model`` is sharded.

    Averaging is idempotent on values that are already equal, so a DDP wrapper on top (or
    gradient accumulation, reducing at every micro-step) still gives the mean gradient.
    """
    if not _distributed():
        return False
    if getattr(replicated, "_lopa_replicated", False):
        return True
    if not _has_fsdp(model):
        return False
    sharded = _managed_by_fsdp(model, replicated)
    if sharded:
        names = ", ".join(f"{name}.{p}" for p in sharded)
        raise ValueError(
            f"FSDP2 shards the {name}'s parameters ({names}); lopa keeps the {name} replicated and averages its "
            f"gradients across processes. Shard the base model only (fully_shard on its decoder layers, then "
            f"fully_shard(model.base_model)), or leave the {name} out: fully_shard(model, "
            f"ignored_params=set(model.{name}.parameters())) -- with accelerate, FSDP_IGNORED_MODULES={name} "
            f"(fsdp_ignored_modules: {name} in its config)"
        )
    for tensor in [*replicated.parameters(), *replicated.buffers()]:
        dist.broadcast(tensor.data, src=0)
    for param in replicated.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_gradient)
    replicated._lopa_replicated = True
    return True


def _managed_by_fsdp(model: nn.Module, part: nn.Module) -> List[str]:
    """Names of ``part``'s parameters in an FSDP2 group of ``model`` (inside a forward they are
    unsharded plain tensors, so their type does not tell).  FSDP2 lists a group's parameters
    only on private attributes; where those are missing, fall back to the DTensor test."""
    fsdp_module = _fsdp_module_type()
    try:
        owned = {(id(fp._module_info.module), fp._module_info.param_name)
                 for m in model.modules() if isinstance(m, fsdp_module)
                 for group in m._get_fsdp_state()._fsdp_param_groups for fp in group.fsdp_params}
    except AttributeError:
        return [name for name, p in part.named_parameters() if _is_dtensor(p)]
    return [f"{prefix}.{name}" if prefix else name for prefix, sub in part.named_modules()
            for name in sub._parameters if (id(sub), name) in owned]


def _average_gradient(param: Tensor) -> None:
    if param.grad is None or not _distributed():
        return
    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
    param.grad.div_(dist.get_world_size())
