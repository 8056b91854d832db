"""``trainer.strategy=fsdp``: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) on Fabric.

FSDP2 shards every parameter as a ``DTensor`` over the data-parallel ranks. Fabric runs it
through its ``ModelParallelStrategy`` with a *parallelize function*; :class:`FSDP2Strategy` is
that strategy with the data-parallel size set to the world size, and checkpoints that may hold
only some of the model's parameters (LoRA adapters). :func:`parallelize` is the function, applied
once to the model the task built:

1. ``fsdp.activation_checkpointing``: each block (the task's ``fsdp_wrap_classes`` or
   ``fsdp.auto_wrap``) is wrapped in torch's non-reentrant activation checkpoint. This comes
   *before* sharding, so the recomputed forward all-gathers its block like the first one.
2. ``fully_shard`` on each block, innermost first, then on the root module (which then owns the
   embeddings, the head and every parameter outside a block). Each block is one all-gather in
   forward and one reduce-scatter in backward.
3. ``fsdp.prefetch_forward`` / ``fsdp.prefetch_backward``: how many blocks ahead the all-gathers
   are issued.
4. ``fsdp.sync_module_states``: rank 0's weights are broadcast into every rank's shards, so ranks
   that built their models differently (a random init drawn per rank) still start equal.

Checkpoints are sharded (``torch.distributed.checkpoint``: one file per rank plus ``.metadata``,
and ``meta.pt`` with everything that is not a tensor of the model or optimizer). ``final/`` is
written from the gathered full state dict (:func:`full_state_dict`).

Self-check: ``python -m core.parallel.fsdp`` (a 2-layer GPT-2 on 2 CPU processes, FSDP2 vs. one
process).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies import ModelParallelStrategy
from lightning.fabric.utilities.types import _Stateful
from torch import nn
from torch.optim import Optimizer

from core.config.schema import FSDPConfig
from core.errors import ConfigError

log = logging.getLogger(__name__)

METADATA_FILE = "meta.pt"
"""Non-tensor state of a sharded checkpoint (counters, RNG states), written by rank 0."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# Settings -> FSDP2 arguments
# --------------------------------------------------------------------------------------------


def resolve_wrap_classes(
    names: Iterable[str], defaults: set[type[nn.Module]]
) -> set[type[nn.Module]]:
    """Module classes that become FSDP units (and activation-checkpointing units).

    Args:
        names: ``fsdp.auto_wrap``: dotted import paths or names of the task's own classes; empty
            for the task's default.
        defaults: the task's ``fsdp_wrap_classes()``.

    Returns:
        The classes.

    Raises:
        ConfigError: a name that cannot be imported.
    """
    names = list(names)
    if not names:
        return set(defaults)
    by_name = {cls.__name__: cls for cls in defaults}
    found = set()
    for name in names:
        if name in by_name:
            found.add(by_name[name])
            continue
        module_name, _, attr = name.rpartition(".")
        try:
            found.add(getattr(importlib.import_module(module_name), attr))
        except (ImportError, AttributeError, ValueError):
            raise ConfigError(
                f"fsdp.auto_wrap: cannot import '{name}'. Give a dotted path such as "
                "'transformers.models.llama.modeling_llama.LlamaDecoderLayer'"
                + (f" or one of {sorted(by_name)}" if by_name else "")
                + "."
            ) from None
    return found


def mixed_precision_dtypes(
    cfg: FSDPConfig, precision: str
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """``(param_dtype, reduce_dtype)`` of FSDP2's ``MixedPrecisionPolicy`` (None: keep the
    parameter's own).

    ``auto``: with ``bf16-mixed`` / ``16-mixed`` the sharded fp32 master weights are all-gathered
    as bfloat16 / float16 for compute; gradients are reduced in float32 whenever compute runs in 16
    bits (``*-mixed`` or ``*-true``), so summing over ranks loses nothing.

    Args:
        cfg: the ``fsdp`` group.
        precision: the resolved ``trainer.precision``.
    """
    half = (
        torch.bfloat16
        if precision.startswith("bf16")
        else (torch.float16 if precision.startswith("16") else None)
    )
    if cfg.param_dtype == "auto":
        param = half if precision.endswith("-mixed") else None
    else:
        param = DTYPES[cfg.param_dtype]
    if cfg.reduce_dtype == "auto":
        reduce = torch.float32 if half is not None else None
    else:
        reduce = DTYPES[cfg.reduce_dtype]
    return param, reduce


def shard_mesh(base_mesh: Any, cfg: FSDPConfig, devices_per_node: int) -> Any:
    """The device mesh ``fully_shard`` shards over.

    ``FULL_SHARD`` / ``SHARD_GRAD_OP``: 1-D over every rank. ``HYBRID_SHARD``: 2-D
    ``(replicate, shard)`` with ``fsdp.shard_size`` ranks per shard group (default: one node), so
    all-gathers stay inside a node and only gradients cross nodes. ``NO_SHARD``: shard groups of 1.

    Args:
        base_mesh: Fabric's mesh (its ``data_parallel`` dimension spans all ranks).
        cfg: the ``fsdp`` group.
        devices_per_node: processes per node.

    Raises:
        ConfigError: a shard size that does not divide the world size.
    """
    mesh = base_mesh["data_parallel"]
    if cfg.sharding_strategy not in ("HYBRID_SHARD", "NO_SHARD"):
        return mesh
    world = mesh.size()
    shard = 1 if cfg.sharding_strategy == "NO_SHARD" else (cfg.shard_size or devices_per_node)
    if world % shard:
        raise ConfigError(
            f"fsdp.shard_size={shard} does not divide the {world} ranks; HYBRID_SHARD needs shard "
            "groups of equal size "
            "(e.g. the GPUs of one node)."
        )
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(
        mesh.device_type, (world // shard, shard), mesh_dim_names=("replicate", "shard")
    )


def blocks_of(model: nn.Module, classes: set[type[nn.Module]]) -> list[nn.Module]:
    """The modules of ``model`` that are instances of ``classes``, in registration (≈ forward)
    order."""
    if not classes:
        return []
    return [m for m in model.modules() if isinstance(m, tuple(classes))]


# --------------------------------------------------------------------------------------------
# The parallelize function
# --------------------------------------------------------------------------------------------


def parallelize(
    model: nn.Module,
    device_mesh: Any,
    *,
    cfg: FSDPConfig,
    wrap_classes: set[type[nn.Module]],
    precision: str,
    devices_per_node: int,
    compile_blocks: bool = False,
) -> nn.Module:
    """Apply activation checkpointing and FSDP2 to ``model`` in place (see the module docstring).

    Args:
        model: the task's model, whole on every rank.
        device_mesh: Fabric's device mesh.
        cfg: the ``fsdp`` group.
        wrap_classes: the block classes.
        precision: the resolved ``trainer.precision``.
        devices_per_node: processes per node (hybrid sharding's default group).
        compile_blocks: ``trainer.compile``: ``torch.compile`` each unit's forward (after the
            checkpoint wrapper, so the checkpoint is inside the compiled region: a compiled
            block inside FSDP2's checkpoint wrapper fails on recomputation), before sharding.

    Returns:
        The same module, now an ``FSDPModule`` whose parameters are ``DTensor`` shards.
    """
    if cfg.activation_checkpointing:
        _apply_activation_checkpointing(model, wrap_classes)
    rank0_state = None
    if cfg.sync_module_states and torch.distributed.get_world_size() > 1:
        # Copied before sharding: afterwards each rank only holds its slice of its own copy.
        rank0_state = (
            {k: v.detach().clone() for k, v in model.state_dict().items()}
            if torch.distributed.get_rank() == 0
            else {}
        )
    mesh = shard_mesh(device_mesh, cfg, devices_per_node)
    param_dtype, reduce_dtype = mixed_precision_dtypes(cfg, precision)
    dtypes = (param_dtype, reduce_dtype)
    blocks = _shard_units(model, mesh, cfg, wrap_classes, dtypes, compile_blocks)
    if rank0_state is not None:
        _load_from_rank0(model, rank0_state)
    log.info(
        "FSDP2: %d blocks (%s) + root, %s over mesh %s, param dtype %s, reduce dtype %s%s%s",
        len(blocks),
        ", ".join(sorted(c.__name__ for c in wrap_classes)) or "none",
        cfg.sharding_strategy,
        tuple(mesh.shape),
        param_dtype or "as stored",
        reduce_dtype or "as stored",
        ", activation checkpointing" if cfg.activation_checkpointing else "",
        ", CPU offload" if cfg.cpu_offload else "",
    )
    if mesh.ndim == 2:  # which ranks share a shard group: those of one node, unless set otherwise
        log.info("HYBRID_SHARD shard groups (global ranks): %s", mesh.mesh.tolist())
    if compile_blocks:
        log.info("trainer.compile: %d blocks compiled (dynamic shapes) with FSDP2", len(blocks))
    return model


def _apply_activation_checkpointing(model: nn.Module, wrap_classes: set[type[nn.Module]]) -> None:
    """Wrap every block of ``wrap_classes`` in ``model`` in a non-reentrant checkpoint wrapper.

    Raises:
        ConfigError: no block classes to wrap.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    if not wrap_classes:
        raise ConfigError(
            "fsdp.activation_checkpointing=true needs block classes: set fsdp.auto_wrap."
        )
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(
            m, checkpoint_impl=CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda m: isinstance(m, tuple(wrap_classes)),
    )


def _load_from_rank0(model: nn.Module, rank0_state: dict[str, Any]) -> None:
    """Overwrite every rank's shards with rank 0's full weights (a broadcast; rank 0 passes
    its full state dict, the others an empty one)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(
        model,
        rank0_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )


def _shard_units(
    model: nn.Module,
    mesh: Any,
    cfg: FSDPConfig,
    wrap_classes: set[type[nn.Module]],
    dtypes: tuple[torch.dtype | None, torch.dtype | None],
    compile_blocks: bool,
) -> list[nn.Module]:
    """``fully_shard`` each block (compiled first if asked), then the root; set prefetching.

    Args:
        model: the model (its blocks already checkpoint-wrapped if asked).
        mesh: the sharding mesh (:func:`shard_mesh`).
        cfg, wrap_classes, compile_blocks: as for :func:`parallelize`.
        dtypes: ``(param_dtype, reduce_dtype)`` from :func:`mixed_precision_dtypes`.

    Returns:
        The sharded blocks in forward order.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    param_dtype, reduce_dtype = dtypes
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": cfg.sharding_strategy != "SHARD_GRAD_OP",
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "offload_policy": CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy(),
    }
    if cfg.activation_checkpointing:  # shard the checkpoint wrappers, so recomputation gathers too
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

        blocks = [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
    else:
        blocks = blocks_of(model, wrap_classes)
    if compile_blocks and blocks:
        for block in blocks:  # the forward only: FSDP2's hooks stay around it, eager
            block.forward = torch.compile(block.forward, dynamic=True)
    # Innermost first: a block nested in another must be sharded before its parent.
    for block in reversed(blocks):
        fully_shard(block, **kwargs)
    # The root keeps FSDP2's own choice (no reshard after forward: backward needs it at once).
    fully_shard(model, **{**kwargs, "reshard_after_forward": None})
    if hasattr(model, "generate"):
        # generate() may call submodules directly (an encoder-decoder's encoder): run it inside
        # the root's forward hooks so the root's parameters (the embeddings) are gathered.
        register_fsdp_forward_method(model, "generate")
    set_prefetch(blocks, cfg.prefetch_forward, cfg.prefetch_backward)
    return blocks


def set_prefetch(blocks: list[nn.Module], forward: int, backward: int) -> None:
    """Explicit all-gather prefetching between the FSDP blocks.

    Args:
        blocks: the sharded blocks in forward order.
        forward: blocks gathered ahead in forward (0: FSDP2's implicit overlap only).
        backward: blocks gathered ahead in backward (1: FSDP2's default; 0: none).
    """
    if forward > 0:
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + forward])
    if backward != 1:
        reverse = blocks[::-1]
        for i, block in enumerate(reverse):
            block.set_modules_to_backward_prefetch(reverse[i + 1 : i + 1 + backward])


# --------------------------------------------------------------------------------------------
# The strategy and its checkpoints
# --------------------------------------------------------------------------------------------


def _is_distributed_module(obj: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(obj, nn.Module) and any(isinstance(p, DTensor) for p in obj.parameters())


class FSDP2Strategy(ModelParallelStrategy):
    """Fabric's ``ModelParallelStrategy`` as pure FSDP2: data parallel over every rank, no tensor
    parallelism, sharded checkpoints that may hold a subset of the model (``filter`` on save,
    ``strict=False`` on load), which Fabric's own implementation refuses.

    Args:
        parallelize_fn: ``(module, device_mesh) -> module``, e.g. :func:`parallelize` with its
        settings bound.
        **kwargs: passed to ``ModelParallelStrategy``.
    """

    def __init__(
        self, parallelize_fn: Callable[[nn.Module, Any], nn.Module], **kwargs: Any
    ) -> None:
        super().__init__(parallelize_fn=parallelize_fn, save_distributed_checkpoint=True, **kwargs)

    def setup_environment(self) -> None:
        """Data parallel size = world size, tensor parallel size = 1 (Fabric's ``auto`` would be
        nodes x GPUs)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Any],
        storage_options: Any = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        """Write ``state`` as a sharded checkpoint folder (collective: every rank calls it).

        Args:
            path: the folder (created).
            state: ``{"model": module, "optimizer": optimizer, other: picklable or stateful}``.
            storage_options: unsupported (must be None).
            filter: ``{"model": fn(name, tensor) -> keep}`` to store part of the model.
        """
        if storage_options is not None:
            raise TypeError("FSDP2Strategy.save_checkpoint takes no storage_options")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(path)))
        module = _single_module(state)
        tensors: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        for key, obj in state.items():
            if isinstance(obj, nn.Module):
                keep = (filter or {}).get(key)
                model_state = get_model_state_dict(obj)
                tensors[key] = {k: v for k, v in model_state.items() if keep is None or keep(k, v)}
            elif isinstance(obj, Optimizer):
                tensors[key] = get_optimizer_state_dict(module, obj)
            else:
                metadata[key] = obj.state_dict() if isinstance(obj, _Stateful) else obj
        if self.global_rank == 0:
            path.mkdir(parents=True, exist_ok=True)
        self.barrier()
        dcp.save(tensors, checkpoint_id=path)
        from core.parallel.checkpoint import on_rank_zero, write_torch_file

        # Written in place and hashed for the checkpoint's manifest; should it fail (a full
        # disk), every rank raises instead of waiting for rank 0 in the barrier.
        on_rank_zero(self, lambda: write_torch_file(metadata, path / METADATA_FILE))
        self.barrier()

    def load_checkpoint(
        self,
        path: Any,
        state: dict[str, Any] | nn.Module | Optimizer | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Restore ``state`` in place from a folder written by :meth:`save_checkpoint`.

        Args:
            path: the checkpoint folder.
            state: ``{"model": module, "optimizer": ..., other keys to fill from the metadata}``.
            strict: False loads only the model tensors the checkpoint holds (adapter-only
                checkpoints); True requires every model tensor and every requested key.
            weights_only: passed to ``torch.load`` for the metadata.

        Returns:
            The metadata entries that were not requested in ``state``.
        """
        path = Path(self.broadcast(str(path)))
        if not isinstance(state, dict) or not (path / ".metadata").is_file():
            return super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)
        _load_sharded_tensors(path, state, strict)
        metadata = torch.load(path / METADATA_FILE, weights_only=bool(weights_only))
        return _restore_metadata(metadata, state, strict)


def _load_sharded_tensors(path: Path, state: dict[str, Any], strict: bool) -> None:
    """Load the model's (and each optimizer's) shards of a checkpoint folder into ``state``.

    Args:
        path: the checkpoint folder.
        state: as for :meth:`FSDP2Strategy.load_checkpoint` (one module, optimizers, others).
        strict: False loads only the model tensors the checkpoint holds.

    Raises:
        KeyError: ``strict`` and the checkpoint lacks a model tensor.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    module_key = next(k for k, v in state.items() if isinstance(v, nn.Module))
    module = state[module_key]
    stored = set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    model_state = get_model_state_dict(module)
    wanted = {k: v for k, v in model_state.items() if strict or f"{module_key}.{k}" in stored}
    missing = [k for k in wanted if f"{module_key}.{k}" not in stored]
    if missing:
        raise KeyError(f"the checkpoint lacks {len(missing)} model tensors, e.g. {missing[0]!r}")
    dcp.load({module_key: wanted}, checkpoint_id=path)
    set_model_state_dict(module, wanted, options=StateDictOptions(strict=strict))
    for key, optimizer in state.items():
        if isinstance(optimizer, Optimizer):
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key])


def _restore_metadata(
    metadata: dict[str, Any], state: dict[str, Any], strict: bool
) -> dict[str, Any]:
    """Fill the non-tensor entries of ``state`` from a checkpoint's metadata.

    Args:
        metadata: the checkpoint's metadata file, loaded (entries are popped as used).
        state: as for :meth:`FSDP2Strategy.load_checkpoint`; stateful objects load in place,
            other entries are replaced.
        strict: True requires every requested key.

    Returns:
        The metadata entries that were not requested in ``state``.
    """
    requested = [k for k, v in state.items() if not isinstance(v, (nn.Module, Optimizer))]
    absent = [k for k in requested if k not in metadata]
    if strict and absent:
        raise KeyError(f"the checkpoint has no {absent}")
    for key in requested:
        if key not in metadata:
            continue
        if isinstance(state[key], _Stateful):
            state[key].load_state_dict(metadata.pop(key))
        else:
            state[key] = metadata.pop(key)
    return metadata


def _single_module(state: dict[str, Any]) -> nn.Module:
    """The one sharded model in a checkpoint state (the optimizer state is keyed by its names)."""
    modules = [v for v in state.values() if _is_distributed_module(v)]
    if len(modules) != 1:
        raise ValueError(
            f"a sharded checkpoint needs exactly one FSDP2 model in its state, found {len(modules)}"
        )
    return modules[0]


def build_strategy(cfg: Any, wrap_defaults: set[type[nn.Module]], precision: str) -> FSDP2Strategy:
    """The FSDP2 strategy for a task's root config.

    Args:
        cfg: the root config (``fsdp`` and ``trainer`` groups).
        wrap_defaults: the task's ``fsdp_wrap_classes()``.
        precision: the resolved ``trainer.precision``.
    """
    import functools

    wrap = resolve_wrap_classes(cfg.fsdp.auto_wrap, wrap_defaults)
    if not wrap:
        log.warning(
            "FSDP2 without block classes: the whole model is one unit (set fsdp.auto_wrap to "
            "shard per block)."
        )
    devices = cfg.trainer.devices
    per_node = (
        int(devices)
        if str(devices).isdigit()
        else int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        or _visible_devices(cfg.trainer.accelerator)
    )
    fn = functools.partial(
        parallelize,
        cfg=cfg.fsdp,
        wrap_classes=wrap,
        precision=precision,
        devices_per_node=per_node,
        compile_blocks=cfg.trainer.compile,
    )
    from datetime import timedelta

    return FSDP2Strategy(parallelize_fn=fn, timeout=timedelta(seconds=cfg.trainer.dist_timeout))


def _visible_devices(accelerator: str) -> int:
    """GPUs visible to this process (1 on the CPU)."""
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def is_fsdp2(strategy: Any) -> bool:
    """Whether Fabric runs this strategy as FSDP2."""
    return isinstance(strategy, FSDP2Strategy)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU, gathered from the shards (collective).

    Returns:
        The full state dict on rank 0; an empty dict on the other ranks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    # A tied parameter (input embeddings = output layer) comes back as two separate tensors;
    # keep it under its first name only, as an unsharded model's save_pretrained would.
    first = {_canonical(n) for n, _ in module.named_parameters()}
    tied = {_canonical(n) for n, _ in module.named_parameters(remove_duplicate=False)} - first
    return {k: v for k, v in state.items() if k not in tied}


def _canonical(name: str) -> str:
    """A parameter name without the activation-checkpoint wrapper's prefix."""
    return name.replace("_checkpoint_wrapped_module.", "")


def local_shard_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of this rank's parameter and gradient shards (``DTensor.to_local``), for memory
    reports."""
    from torch.distributed.tensor import DTensor

    params = grads = 0
    for p in module.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        params += local.numel() * local.element_size()
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grads += g.numel() * g.element_size()
    return {"params": params, "grads": grads}


def unsupported_reason(cfg: Any, device_type: str) -> str | None:
    """Why FSDP2 cannot run this config on this machine, or None."""
    if cfg.fsdp.cpu_offload and device_type != "cuda":
        return (
            "fsdp.cpu_offload=true moves shards between GPU and CPU memory; on the CPU they "
            "are in CPU memory already: set fsdp.cpu_offload=false"
        )
    return None


if __name__ == "__main__":  # self-check: python -m core.parallel.fsdp (own process: Fabric starts
    # rank 1)
    import functools

    from lightning.fabric import Fabric
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    from core.parallel.strategy import destroy_process_group_at_exit

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    net = GPT2LMHeadModel(config)
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    fn = functools.partial(
        parallelize,
        cfg=FSDPConfig(),
        wrap_classes={GPT2Block},
        precision="32-true",
        devices_per_node=2,
    )
    fabric = Fabric(accelerator="cpu", devices=2, strategy=FSDP2Strategy(parallelize_fn=fn))
    destroy_process_group_at_exit()
    fabric.launch()
    model = fabric.setup_module(net)
    loss = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss
    fabric.backward(loss)
    shard = local_shard_bytes(net)
    gathered = full_state_dict(net)
    if fabric.global_rank == 0:
        same = all(torch.equal(gathered[k], reference[k]) for k in gathered)
        total = sum(p.numel() * p.element_size() for p in reference.values())
        print(f"rank 0 holds {shard['params']} of the model's {total} bytes")
        print(f"loss {float(loss.detach()):.4f}; gathered state dict == unsharded model: {same}")
        assert same
        print("core.parallel.fsdp: ok")
