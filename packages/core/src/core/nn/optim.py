"""Optimizers by name and learning-rate schedules with warmup.

- :func:`parameter_groups`: weight decay only on weight matrices (not biases, norms, embeddings
  of norms); frozen parameters are left out.
- :func:`build_optimizer`: ``adamw``, ``adamw_fused``, ``sgd``, ``adafactor`` (:class:`Adafactor`:
  transformers' update with a fixed learning rate, also on FSDP2's sharded parameters),
  ``adamw_8bit`` / ``paged_adamw_8bit`` / ``paged_adamw_32bit`` (bitsandbytes).
- :class:`WarmupSchedule`: linear warmup, then constant, linear or cosine decay, as a
  multiplicative factor for ``LambdaLR`` (so per-group learning rates keep their ratios).

Self-check: ``python -m core.nn.optim``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from core.config.schema import OptimConfig
from core.errors import ConfigError

_NO_DECAY_HINTS = ("bias", "norm", "ln_", "layernorm", "layer_norm", "rmsnorm")


def parameter_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, name: str = ""
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into decay / no-decay groups.

    Args:
        model: the module.
        weight_decay: decay of the weight group.
        lr: optional learning rate for both groups (default: the optimizer's).
        name: label kept in each group (shows up in logs as ``lr/<name>``).

    Returns:
        Up to two param-group dicts; empty groups are dropped.
    """
    decay, no_decay = [], []
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = pname.lower()
        if param.ndim < 2 or any(h in lowered for h in _NO_DECAY_HINTS):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    for params, wd, suffix in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
        if params:
            group: dict[str, Any] = {
                "params": params,
                "weight_decay": wd,
                "name": f"{name}{'/' if name else ''}{suffix}",
            }
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
    return groups


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ConfigError(
            "The 8-bit / paged optimizers need bitsandbytes: install core[bnb] "
            f"(it comes with lora_llm) or choose optim.name=adamw. ({err})"
        ) from None
    return bnb


BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
"""``optim.name`` values made by bitsandbytes: they update plain tensors only."""


def check_strategy(cfg: Any) -> None:
    """Refuse an optimizer the chosen ``trainer.strategy`` cannot step, before anything launches.

    bitsandbytes' optimizers call their own kernels on each parameter; FSDP2's parameters are
    ``DTensor`` shards, for which those kernels have no sharding rule (the first step fails with
    ``NotImplementedError: Operator bitsandbytes.optimizer_update_32bit.default does not have a
    sharding strategy registered``), on any number of ranks. torchao's 8-bit AdamW does take
    ``DTensor`` shards and steps within 3e-5 of bitsandbytes' on plain tensors, but on the CPU it
    compiles every parameter shape at the first step (8-40 s each here), and its quantized state
    is a tensor subclass the FSDP2 checkpoints have not been tested with: not a drop-in today.

    Args:
        cfg: the root config (``optim.name`` and ``trainer.strategy`` are read).

    Raises:
        ConfigError: a bitsandbytes optimizer with ``trainer.strategy=fsdp``.
    """
    if cfg.trainer.strategy == "fsdp" and cfg.optim.name in BNB_OPTIMIZERS:
        raise ConfigError(
            f"Config key 'optim.name' = {cfg.optim.name} (a bitsandbytes optimizer) cannot update "
            "the sharded parameters of trainer.strategy=fsdp (FSDP2). Use optim.name=adamw or "
            f"optim.name=adafactor with fsdp, or keep optim.name={cfg.optim.name} with "
            "trainer.strategy=ddp (or a single process)."
        )


def build_optimizer(
    groups: Iterable[dict[str, Any]], cfg: OptimConfig, device_type: str = "cpu"
) -> torch.optim.Optimizer:
    """Create the optimizer named in ``cfg.name`` over the given parameter groups.

    Args:
        groups: param groups (from :func:`parameter_groups` or a task's own split).
        cfg: the ``optim`` config group.
        device_type: ``cpu`` / ``cuda``: ``adamw_fused`` needs CUDA.

    Returns:
        The optimizer; every group has ``initial_lr`` set for the schedule.
    """
    groups = [dict(g) for g in groups]
    if not any(g["params"] for g in groups):
        raise ConfigError(
            "No trainable parameters: every parameter is frozen. Check the model's freezing "
            "switches."
        )
    betas = tuple(cfg.betas)
    if cfg.name == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    elif cfg.name == "adamw_fused":
        if device_type != "cuda":
            raise ConfigError(
                "optim.name=adamw_fused needs a CUDA device; use optim.name=adamw on the CPU."
            )
        opt = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True
        )
    elif cfg.name == "sgd":
        opt = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    elif cfg.name == "adafactor":
        # A fixed, scheduled learning rate (the users' recipe), not Adafactor's relative step size.
        opt = Adafactor(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.name in BNB_OPTIMIZERS:
        bnb = _bnb()
        cls = {
            "adamw_8bit": bnb.optim.AdamW8bit,
            "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        }[cfg.name]
        opt = cls(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:  # pragma: no cover - the config's Literal type rules this out
        raise ConfigError(f"Unknown optimizer optim.name={cfg.name!r}.")
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    keep_state_dtypes(opt)
    return opt


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern, 2018) as transformers' ``Adafactor(scale_parameter=False,
    relative_step=False, warmup_init=False)`` runs it (the Hugging Face Trainer's ``adafactor``):
    factored second moments for matrices, update clipping, no first moment, a fixed (scheduled)
    learning rate. Same arithmetic in the same order, so the same weights on plain tensors (tested).

    Why not transformers' class: it creates the factored statistics with ``torch.zeros(shape)``,
    which cannot be mixed with FSDP2's ``DTensor`` parameters. Here every statistic is made from
    the gradient itself (``zeros_like`` of its row / column means), so it takes the gradient's
    sharding: rows stay sharded like the parameter, column statistics are replicated, and the
    reductions across shards are done by ``DTensor``.

    State per parameter (float32, whatever the parameter's dtype): ``step``; ``exp_avg_sq_row``
    ``(*shape[:-1])`` and ``exp_avg_sq_col`` ``(*shape[:-2], shape[-1])`` for tensors of 2+
    dimensions, else ``exp_avg_sq`` (same shape as the parameter).

    Args:
        params: parameters or groups.
        lr: learning rate.
        eps: ``(eps1, eps2)``: added to squared gradients; (unused here) floor of the parameter
        scale.
        clip_threshold: the update's RMS is clipped to this.
        decay_rate: ``beta2_t = 1 - step^decay_rate``.
        weight_decay: decoupled weight decay (times ``lr``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params,
            {
                "lr": lr,
                "eps": eps,
                "clip_threshold": clip_threshold,
                "decay_rate": decay_rate,
                "weight_decay": weight_decay,
            },
        )

    @staticmethod
    def _rms(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.norm(2) / (tensor.numel() ** 0.5)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One update of every parameter with a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad.float() if p.grad.dtype in (torch.float16, torch.bfloat16) else p.grad
        state = self.state[p]
        factored = grad.dim() >= 2
        update = (grad**2) + group["eps"][0]
        if not state:
            state["step"] = 0
            if factored:
                state["exp_avg_sq_row"] = torch.zeros_like(update.mean(dim=-1))
                state["exp_avg_sq_col"] = _replicated(torch.zeros_like(update.mean(dim=-2)))
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        p_fp32 = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        state["step"] += 1
        lr = group["lr"]
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            # The factored estimate of E[grad^2]: row x col / mean(row), as an inverse square root.
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grad)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad)
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["weight_decay"] != 0:
            p_fp32.add_(p_fp32, alpha=-group["weight_decay"] * lr)
        p_fp32.add_(-update)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.copy_(p_fp32)


def _replicated(tensor: torch.Tensor) -> torch.Tensor:
    """A ``DTensor`` made whole on every rank (a column statistic of a row-sharded matrix);
    a plain tensor as it is."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(tensor, DTensor):
        return tensor.redistribute(placements=[Replicate()] * tensor.device_mesh.ndim)
    return tensor


def keep_state_dtypes(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` keep the saved dtype of every state tensor.

    torch casts floating state tensors to their parameter's dtype when loading. Optimizers that
    keep float32 statistics for bfloat16 parameters (Adafactor, 8-bit optimizers' scales) would
    come back with bf16 statistics, so a resumed run would drift from an uninterrupted one. The
    pre-hook remembers the state as saved; the post-hook puts back each tensor whose dtype the
    cast changed (the cast copy has already lost the precision, so it cannot be re-cast).
    """
    saved: dict[str, Any] = {}

    def pre_hook(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in opt.param_groups for p in group["params"]]
        saved["by_param"] = {
            p: state_dict["state"][i] for i, p in zip(saved_ids, params) if i in state_dict["state"]
        }

    def post_hook(opt: torch.optim.Optimizer) -> None:
        for param, entries in saved.pop("by_param", {}).items():
            live = opt.state.get(param, {})
            for key, value in entries.items():
                current = live.get(key)
                if (
                    torch.is_tensor(value)
                    and torch.is_tensor(current)
                    and value.is_floating_point()
                    and current.dtype != value.dtype
                ):
                    live[key] = value.to(device=current.device)

    optimizer.register_load_state_dict_pre_hook(pre_hook)
    optimizer.register_load_state_dict_post_hook(post_hook)


class WarmupSchedule:
    """Learning-rate factor for step ``s``: linear warmup to 1, then the chosen decay.

    Args:
        total_steps: optimizer steps of the whole run.
        warmup_steps: steps of linear warmup.
        kind: ``constant``, ``linear`` or ``cosine``.
        min_ratio: factor at the last step for ``linear`` / ``cosine``.
    """

    def __init__(
        self, total_steps: int, warmup_steps: int, kind: str, min_ratio: float = 0.0
    ) -> None:
        self.total_steps = max(1, total_steps)
        self.warmup_steps = max(0, min(warmup_steps, self.total_steps))
        self.kind = kind
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length in steps: ``warmup_steps`` if set, else ``warmup_ratio * total_steps``."""
    return (
        cfg.warmup_steps if cfg.warmup_steps > 0 else int(math.ceil(cfg.warmup_ratio * total_steps))
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping once per optimizer step.

    Args:
        optimizer: the optimizer.
        cfg: the ``optim`` group.
        total_steps: optimizer steps of the whole run.
    """
    schedule = WarmupSchedule(
        total_steps, warmup_steps(cfg, total_steps), cfg.scheduler, cfg.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)


if __name__ == "__main__":  # self-check: python -m core.nn.optim
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4, 4))
    model.add_module("norm", nn.LayerNorm(4))
    groups = parameter_groups(model, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    for name in ("adamw", "sgd", "adafactor", "adamw_8bit", "paged_adamw_8bit"):
        opt = build_optimizer(groups, OptimConfig(name=name, lr=1e-3))
        print(f"{name:>16}: {type(opt).__module__}.{type(opt).__name__}")
    from core.config.schema import TrainConfig
    from core.errors import UserError

    refused = TrainConfig()
    refused.trainer.strategy, refused.optim.name = "fsdp", "paged_adamw_8bit"
    try:
        check_strategy(refused)
    except UserError as err:
        print("fsdp + paged_adamw_8bit ->", err)
    else:
        raise AssertionError("a bitsandbytes optimizer under fsdp must be refused")
    opt = build_optimizer(groups, OptimConfig(lr=1.0))
    sched = build_scheduler(
        opt, OptimConfig(lr=1.0, warmup_steps=2, scheduler="cosine"), total_steps=10
    )
    lrs = []
    for _ in range(10):
        lrs.append(round(opt.param_groups[0]["lr"], 3))
        opt.step()
        sched.step()
    print("cosine with 2 warmup steps:", lrs)
    assert lrs[0] < lrs[1] < lrs[2] == 1.0 and lrs[-1] < 0.1
    print("core.nn.optim: ok")
