"""One GPU's training memory from a model's architecture, without weights: the shared estimator
behind every task's ``train --dry-run``.

A task builds its model on PyTorch's ``meta`` device (shapes only) from the architecture's
public ``config.json`` values (shipped in the package for its Hub presets), counts parameters
exactly, and gives this module the sizes; the rules that do not depend on the task live here:

- **sharding** (:func:`shard_ranks`): ``trainer.strategy=fsdp`` divides weights, gradients and
  optimizer state by the ranks of a shard group (all ranks for ``FULL_SHARD`` /
  ``SHARD_GRAD_OP``, ``fsdp.shard_size`` or a node for ``HYBRID_SHARD``, 1 for ``NO_SHARD``) and
  adds the gathered parameters of two units (the one computing and the one prefetched); DeepSpeed
  stage 1 / 2 / 3 divide optimizer state / + gradients / + weights. DDP divides nothing.
- **activations** (:func:`layer_activation_bytes`, :func:`stack_activation_bytes`): per layer
  and token ``e*((10 + t)h + 4i) + 28h`` bytes (``e`` bytes per activation, ``t`` LoRA-adapted
  projections; fitted to what autograd saves for Llama layers, see lora_llm's tests); with
  activation checkpointing only each layer's input ``e*h`` per token plus one recomputed layer;
  with ``trainer.offload_activations`` the checkpointed inputs wait in CPU memory and one layer
  plus one input in transit stay on the GPU.
- **logits and loss** (:func:`logits_bytes`): plain ``tokens x vocab x (e + 12)`` bytes (the
  logits, their float32 copy, log-softmax and its gradient); with ``loss.chunked`` about three
  float32 ``chunk_tokens x vocab`` buffers plus the hidden states' gradient.

Switches whose effect is not modelled (``trainer.compile``, Liger Kernel: both lower the peak a
little, by fusing) are listed in the report as such. The CUDA context and allocator slack (about
0.5-1 GiB) come on top. Real numbers: ``memory/peak_allocated_gb`` in ``metrics.jsonl``.

Self-check: ``python -m core.commands.estimate``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from core.config.schema import LossConfig, TrainConfig
from core.errors import UserError

GIB = 2**30

OPTIMIZER_BYTES = {
    "adamw": 8,
    "adamw_fused": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "sgd": 0,
}
"""Optimizer state bytes per trainable parameter (SGD with momentum: 4; Adafactor: see
:func:`optimizer_bytes`)."""


def world_size(cfg: TrainConfig) -> int:
    """Ranks the run will have: ``trainer.devices`` (``auto``: 1) x ``trainer.num_nodes``."""
    from core.parallel.strategy import parse_devices

    return (parse_devices(cfg.trainer.devices) or 1) * cfg.trainer.num_nodes


def shard_ranks(cfg: TrainConfig) -> dict[str, int]:
    """Over how many ranks weights, gradients and optimizer state are divided.

    Returns:
        ``{"weights", "gradients", "optimizer", "world"}`` rank counts.
    """
    world = world_size(cfg)
    strategy = cfg.trainer.strategy
    split = {"weights": 1, "gradients": 1, "optimizer": 1, "world": world}
    if strategy == "fsdp":
        kind = cfg.fsdp.sharding_strategy
        per_node = world // max(cfg.trainer.num_nodes, 1)
        group = {"NO_SHARD": 1, "HYBRID_SHARD": cfg.fsdp.shard_size or per_node}.get(kind, world)
        split.update(weights=group, gradients=group, optimizer=group)
    elif strategy.startswith("deepspeed_stage_"):
        stage = int(strategy.removeprefix("deepspeed_stage_")[0])
        split.update(
            optimizer=world,
            gradients=world if stage >= 2 else 1,
            weights=world if stage >= 3 else 1,
        )
    return split


def compute_bytes(precision: str) -> int:
    """Bytes per activation value: 2 under 16-bit precision (mixed or true), 4 in float32."""
    return 2 if precision.startswith(("bf16", "16")) else 4


def autocast_bytes(precision: str) -> int:
    """Bytes per activation value when ``auto`` counts as what it picks on a GPU with bfloat16
    (bf16-mixed: 2); else :func:`compute_bytes`."""
    return 2 if precision == "auto" else compute_bytes(precision)


def weight_bytes(precision: str) -> int:
    """Bytes per stored parameter: 2 under ``*-true`` 16-bit precision, else 4 (float32 masters)."""
    return 2 if precision in ("bf16-true", "16-true") else 4


def optimizer_bytes(name: str, trainable: Iterable[torch.Tensor], momentum: float = 0.0) -> float:
    """Optimizer state of the trainable parameters, in bytes.

    Args:
        name: ``optim.name``.
        trainable: the trainable parameters (meta tensors are fine: only shapes are read).
        momentum: ``optim.momentum`` (SGD keeps a buffer when it is not 0).

    Returns:
        Bytes; Adafactor keeps float32 row and column statistics of each matrix (``4*(r + c)``)
        and a full float32 statistic of each vector.
    """
    total = 0.0
    for p in trainable:
        if name == "adafactor":
            total += 4 * (p.shape[0] + p.shape[-1]) if p.dim() >= 2 else 4 * p.numel()
        elif name == "sgd":
            total += 4 * p.numel() if momentum else 0
        else:
            total += OPTIMIZER_BYTES[name] * p.numel()
    return total


def trained_state(
    cfg: TrainConfig, model: torch.nn.Module
) -> tuple[int, int, dict[str, float], dict[str, str]]:
    """Parameter counts of a (meta-device) model trained in full or in parts, and the bytes per
    GPU of its weights, gradients and optimizer state.

    Args:
        cfg: gives ``trainer.precision``, ``optim`` and the sharding (:func:`shard_ranks`).
        model: the task's model with ``requires_grad`` set as training will set it.

    Returns:
        ``(parameters, trainable, bytes, notes)``: counts with a tied tensor once; ``bytes`` and
        ``notes`` keyed ``weights``, ``gradients``, ``optimizer`` (notes for the first and last)
        as :func:`memory_report` takes them.
    """
    params = list(model.parameters())  # a tied tensor once
    total = sum(p.numel() for p in params)
    trainable_params = [p for p in params if p.requires_grad]
    trainable = sum(p.numel() for p in trainable_params)
    split = shard_ranks(cfg)
    stored = weight_bytes(cfg.trainer.precision)
    optim = optimizer_bytes(cfg.optim.name, trainable_params, cfg.optim.momentum)
    sizes = {
        "weights": total * stored / split["weights"],
        "gradients": trainable * stored / split["gradients"],
        "optimizer": optim / split["optimizer"],
    }
    notes = {
        "weights": f"{total:,} parameters x {stored} bytes / {split['weights']}",
        "optimizer": cfg.optim.name,
    }
    return total, trainable, sizes, notes


def layer_activation_bytes(hidden: int, inner: int, act_bytes: int, lora_targets: int) -> float:
    """What autograd saves for one transformer layer per token (see the module docstring)."""
    return act_bytes * ((10 + lora_targets) * hidden + 4 * inner) + 28 * hidden


def stack_activation_bytes(
    layers: int,
    tokens: int,
    per_token_layer: float,
    hidden: int,
    act_bytes: int,
    checkpointing: bool,
    offload: bool,
) -> float:
    """Activations a stack of ``layers`` identical layers keeps on the GPU for backward.

    Args:
        layers: layers of the stack.
        tokens: tokens of the micro-batch that pass through it.
        per_token_layer: :func:`layer_activation_bytes` of one layer.
        hidden: width of the stream between layers.
        act_bytes: bytes per activation value.
        checkpointing: activation checkpointing of every layer.
        offload: ``trainer.offload_activations`` (checkpointed inputs in CPU memory).

    Returns:
        Bytes.
    """
    one_layer = tokens * per_token_layer
    layer_input = tokens * hidden * act_bytes
    if offload:  # one layer working (recomputed) plus one input on its way back
        return one_layer + layer_input
    if checkpointing:
        return layers * layer_input + one_layer
    return layers * one_layer


def logits_bytes(tokens: int, vocab: int, hidden: int, act_bytes: int, loss: LossConfig) -> float:
    """Memory of the head's logits and the loss for ``tokens`` labelled tokens.

    Returns:
        Bytes: plain ``tokens*vocab*(e + 12)``; chunked ``3 x 4 x min(tokens, chunk)*vocab`` plus
        the hidden states' gradient ``tokens*hidden*e``.
    """
    if not loss.chunked:
        return float(tokens * vocab * (act_bytes + 12))
    return float(3 * 4 * min(tokens, loss.chunk_tokens) * vocab + tokens * hidden * act_bytes)


def setup_lines(
    cfg: TrainConfig, shape: str, switches: str = "", auto_bf16: bool = False
) -> dict[str, str]:
    """The report's lines on the run's shape: strategy and ranks, precision, batch, switches.

    Args:
        cfg: the root config (``loss`` group read when the task has one).
        shape: the task's description of one sample's size (sequence length, image size).
        switches: the task's own switches, appended to the shared ones (``", name=value, ..."``).
        auto_bf16: the estimate counts ``trainer.precision=auto`` as bf16-mixed (and says so).
    """
    split = shard_ranks(cfg)
    strategy = cfg.trainer.strategy
    if strategy == "fsdp":
        how = (
            f"fsdp {cfg.fsdp.sharding_strategy} over {split['world']} ranks: weights, gradients "
            f"and optimizer state / {split['weights']}"
        )
    elif strategy.startswith("deepspeed"):
        how = (
            f"{strategy} over {split['world']} ranks: weights / {split['weights']}, gradients / "
            f"{split['gradients']}, optimizer state / {split['optimizer']}"
        )
    else:
        replicas = "1 rank" if split["world"] == 1 else f"DDP over {split['world']} ranks"
        how = f"{replicas}: every rank holds everything"
    loss = getattr(cfg, "loss", None)
    shared = [
        f"loss.chunked={str(loss.chunked).lower()} ({loss.chunk_tokens} tokens per chunk)"
        if loss is not None
        else "loss: plain (task without a chunked loss)",
        f"trainer.offload_activations={str(cfg.trainer.offload_activations).lower()}",
        f"trainer.compile={str(cfg.trainer.compile).lower()} (not modelled)",
    ]
    precision = cfg.trainer.precision
    if auto_bf16 and precision == "auto":
        precision = "auto (bf16-mixed on a GPU with bfloat16)"
    return {
        "strategy": how,
        "precision": precision,
        "batch": f"micro-batch {cfg.trainer.batch_size} x accumulation "
        f"{cfg.trainer.accumulate_grad_batches} x {split['world']} ranks; {shape}",
        "switches": ", ".join(shared) + switches,
    }


def checkpointing(cfg: TrainConfig, model_switch: bool) -> bool:
    """Whether activations are checkpointed: ``fsdp.activation_checkpointing`` under FSDP, else
    the task's own switch (``model.gradient_checkpointing``)."""
    return cfg.fsdp.activation_checkpointing if cfg.trainer.strategy == "fsdp" else model_switch


def largest_unit(model: torch.nn.Module, suffixes: tuple[str, ...]) -> int:
    """Parameters of the largest module whose class name ends with one of ``suffixes`` (the
    layers FSDP wraps as units); 0 when there is none."""
    return max(
        (
            sum(p.numel() for p in m.parameters())
            for m in model.modules()
            if type(m).__name__.endswith(suffixes)
        ),
        default=0,
    )


def on(value: bool) -> str:
    """A switch as the report writes it: ``true`` / ``false``."""
    return str(value).lower()


def shipped_architectures(module_file: str | Path) -> dict[str, dict[str, Any]]:
    """The ``assets/architectures.json`` of a task package (``module_file``: a module of it):
    the public ``config.json`` values of its Hub presets, by model name, so that a dry run works
    offline."""
    import json

    path = Path(module_file).parent / "assets" / "architectures.json"
    return json.loads(path.read_text(encoding="utf-8"))


def shipped_config(name: str, known: dict[str, Any], build: Any = None) -> tuple[Any, str]:
    """The transformers config of a model whose architecture is shipped in ``known`` or lies in a
    local folder.

    Args:
        name: ``model.name``.
        known: shipped ``config.json`` values by model name.
        build: ``values -> config`` (default: ``AutoConfig.for_model(model_type, **rest)``).

    Returns:
        ``(config, source)``.

    Raises:
        UserError: neither shipped nor a local folder with a ``config.json``.
    """
    from transformers import AutoConfig

    if name in known:
        values = dict(known[name])
        config = (
            build(values) if build else AutoConfig.for_model(values.pop("model_type"), **values)
        )
        return config, "shipped copy of config.json"
    if (Path(name) / "config.json").is_file():
        return AutoConfig.from_pretrained(name), "config.json"
    raise UserError(
        f"Cannot read the architecture of '{name}' (model.name) offline: not a local folder and "
        f"not one of the shipped architectures ({', '.join(known)})."
    )


def gathered_unit_bytes(cfg: TrainConfig, largest_unit_params: int) -> float:
    """Under FSDP: the unsharded parameters of two units at a time (computing + prefetched), in
    the compute dtype; 0 for other strategies."""
    if cfg.trainer.strategy != "fsdp" or cfg.fsdp.sharding_strategy == "NO_SHARD":
        return 0.0
    return 2.0 * largest_unit_params * compute_bytes(cfg.trainer.precision)


COMPONENTS = {
    "weights": "weights",
    "base_weights": "base weights",
    "adapters_and_optimizer": "adapters + optimizer",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations",
    "logits": "logits + loss",
    "gathered": "gathered FSDP units",
}
"""Memory components of a dry-run report: key (in its JSON) -> label (in its text)."""


def memory_report(
    *,
    model: str,
    architecture: dict[str, Any],
    config_source: str,
    parameters: int,
    trainable: int,
    setup: dict[str, str],
    components: dict[str, float],
    notes: dict[str, str],
    **extra: Any,
) -> dict[str, Any]:
    """The report every task's dry run prints (text with :func:`format_report`, or JSON).

    Args:
        model, architecture, config_source: what is estimated (``architecture`` holds ``type``
            and the facts to show).
        parameters, trainable: parameter counts.
        setup: :func:`setup_lines` plus the task's own lines.
        components: bytes per GPU by :data:`COMPONENTS` key, in display order; their sum is
            the peak. A ``gathered`` component of 0 bytes (no FSDP) is not shown.
        notes: per component key, how it was counted.
        extra: task facts added to the report as they are.

    Returns:
        ``model``, ``architecture``, ``config_source``, ``parameters``,
        ``trainable_parameters``, ``trainable_share``, ``setup``, ``rows`` ((label, key) shown),
        ``bytes`` (per key, and ``total``), ``notes`` and ``extra``'s keys.
    """
    return {
        "model": model,
        "architecture": architecture,
        "config_source": config_source,
        "parameters": parameters,
        "trainable_parameters": trainable,
        "trainable_share": trainable / parameters,
        **extra,
        "setup": setup,
        "rows": [
            (COMPONENTS[key], key) for key, size in components.items() if size or key != "gathered"
        ],
        "bytes": {**components, "total": sum(components.values())},
        "notes": notes,
    }


def trained_report(
    cfg: TrainConfig,
    model: torch.nn.Module,
    *,
    name: str,
    config: Any,
    source: str,
    facts: dict[str, Any],
    setup: dict[str, str],
    units: tuple[str, tuple[str, ...]],
    parts: dict[str, tuple[float, str]],
    notes: dict[str, str] | None = None,
    state: tuple[int, int, dict[str, float], dict[str, str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """:func:`memory_report` of a model trained in full or in parts: :func:`trained_state`
    (weights, gradients, optimizer state), the task's ``parts`` and the gathered FSDP units.

    Args:
        cfg: the root config.
        model: the task's meta-device model with ``requires_grad`` set as training sets it.
        name / config / source: ``model`` (shown name), the transformers config (its
            ``model_type``) and where it came from.
        facts: the architecture facts to show (``layers``, ``hidden``, ...).
        setup: :func:`setup_lines` of the run.
        units: what FSDP wraps as units: their name in the note (``"layers"``) and class-name
            endings (:func:`largest_unit`).
        parts: ``{key: (bytes, note)}`` the task computes (``activations``, ``logits``).
        notes: more notes, e.g. on ``gradients`` (they come before the parts' notes).
        state: the task's own ``(parameters, trainable, bytes, notes)`` in place of
            :func:`trained_state` (lora_llm: quantized base weights, adapters).
        extra: task facts for the report (:func:`memory_report`).
    """
    total, trainable, sizes, state_notes = state or trained_state(cfg, model)
    what, suffixes = units
    unit = largest_unit(model, suffixes)
    return memory_report(
        model=name,
        architecture={"type": config.model_type, **facts},
        config_source=source,
        parameters=total,
        trainable=trainable,
        setup=setup,
        components={**sizes, **{k: v for k, (v, _) in parts.items()}}
        | {"gathered": gathered_unit_bytes(cfg, unit)},
        notes={**state_notes, **(notes or {}), **{k: n for k, (_, n) in parts.items()}}
        | {"gathered": f"two {what} unsharded at a time"},
        **extra,
    )


def gpu_verdict(report: dict[str, Any], gpu_gb: int, advice: str) -> str:
    """``"<N> GB GPU  fits"`` when the peak plus 1 GiB of CUDA context and slack fits in
    ``gpu_gb`` GB, else ``does NOT fit: <advice>``."""
    fits = report["bytes"]["total"] / GIB + 1.0 <= gpu_gb * 1e9 / GIB
    return f"{f'{gpu_gb} GB GPU':<21}" + ("fits" if fits else f"does NOT fit: {advice}")


def format_report(report: dict[str, Any], verdict: str | None = None) -> str:
    """The report as aligned text: model, parameters, setup, one line per memory component (with
    its note), the estimated peak per GPU and the task's verdict line."""
    arch = report["architecture"]
    facts = ", ".join(f"{k} {v}" for k, v in arch.items() if k != "type")
    lines = [
        f"model                {report['model']} ({arch['type']}, {facts}; "
        f"architecture from {report['config_source']})",
        f"parameters           {report['parameters']:,} total, "
        f"{report['trainable_parameters']:,} trainable "
        f"({100 * report['trainable_share']:.3f}%)",
    ]
    for key, text in report["setup"].items():
        lines.append(f"{key:<21}{text}")
    for label, key in report["rows"]:
        note = report["notes"].get(key, "")
        lines.append(
            f"{label:<21}{report['bytes'][key] / GIB:6.2f} GiB" + (f"  ({note})" if note else "")
        )
    lines.append(
        f"estimated peak       {report['bytes']['total'] / GIB:6.2f} GiB per GPU  + CUDA context "
        "and allocator slack (about 0.5-1 GiB)"
    )
    if verdict:
        lines.append(verdict)
    return "\n".join(lines)


def dry_run_command(
    argv: list[str],
    *,
    config_cls: type,
    presets_dir: Any,
    default_preset: str | None,
    estimate: Any,
    render: Any,
) -> int:
    """``train --dry-run [-c PRESET] [key=value ...] [--json]`` of a task: the config as
    ``train`` would build it, then the task's estimate, printed as text (or JSON); no weights, no
    network, no run folder.

    Args:
        argv: the arguments without ``--dry-run``.
        config_cls / presets_dir / default_preset: as for ``core.commands.train.train_command``.
        estimate: ``cfg -> report`` of the task.
        render: ``report -> text`` of the task.

    Returns:
        Exit code 0 (a mistake in the input raises ``UserError``: exit code 2 by the caller).
    """
    import json

    from core.commands.train import parse_train_args

    as_json = "--json" in argv
    cfg, _ = parse_train_args(
        [a for a in argv if a != "--json"],
        prog="train --dry-run",
        description="Parameters and estimated training memory per GPU (add --json for JSON).",
        config_cls=config_cls,
        presets_dir=presets_dir,
        default_preset=default_preset,
    )
    report = estimate(cfg)
    print(json.dumps(report, indent=1, default=str) if as_json else render(report))
    return 0


def decoder_activation_bytes(
    config: Any,
    batch: int,
    seq: int,
    act_bytes: int,
    checkpointing: bool,
    lora_targets: int,
    eager: bool,
    offload: bool = False,
) -> dict[str, float]:
    """Activations and plain logits of one ``batch x seq`` micro-batch of a decoder-only
    transformers ``config`` (``hidden_size``, ``intermediate_size`` or ``n_inner``,
    ``num_attention_heads``, ``num_hidden_layers``, ``vocab_size``).

    Args:
        act_bytes / lora_targets / checkpointing / offload: as for
            :func:`layer_activation_bytes` and :func:`stack_activation_bytes`.
        eager: eager attention, which keeps ``heads*seq*seq*(2e+1)`` bytes per layer and token
            row besides.

    Returns:
        ``{"activations", "logits"}`` in bytes (logits unchunked).
    """
    h = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    tokens = batch * seq
    per_token = layer_activation_bytes(h, inner, act_bytes, lora_targets)
    if eager:
        per_token += config.num_attention_heads * seq * (2 * act_bytes + 1)
    activations = stack_activation_bytes(
        config.num_hidden_layers, tokens, per_token, h, act_bytes, checkpointing, offload
    )
    return {
        "activations": float(activations),
        "logits": float(tokens * config.vocab_size * (act_bytes + 12)),
    }


def architecture_config(
    name: str, known: dict[str, Any], revision: str | None = None, trust_remote_code: bool = False
) -> tuple[Any, str]:
    """The transformers config of ``name`` from where it can be read: a local folder, the
    Hugging Face cache or the Hub (when reachable and ``name`` is not shipped), else the shipped
    ``known`` values (:func:`shipped_config`).

    Returns:
        ``(config, source)``.

    Raises:
        UserError: none of these has it.
    """
    from core.task.hub import ensure_available, hub_reachable, is_cached, looks_like_path

    if looks_like_path(name) or is_cached(name) or (name not in known and hub_reachable()):
        from transformers import AutoConfig

        ensure_available(name, what="model", key="model.name")
        return AutoConfig.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code
        ), "config.json"
    if name in known:
        return shipped_config(name, known)
    raise UserError(
        f"Cannot read the architecture of '{name}' (model.name): not a local folder, not in the "
        "Hugging Face cache, the Hub is not reachable, and it is not one of the shipped "
        f"architectures ({', '.join(known)})."
    )


if __name__ == "__main__":  # self-check: python -m core.commands.estimate
    from transformers import AutoConfig

    from core.config.loader import load_config

    cfg = load_config(
        TrainConfig,
        overrides=["trainer.strategy=fsdp", "trainer.devices=4", "trainer.precision=bf16-true"],
    )
    assert shard_ranks(cfg)["weights"] == 4
    assert checkpointing(cfg, False) == cfg.fsdp.activation_checkpointing
    assert autocast_bytes("auto") == 2 and autocast_bytes("32-true") == 4
    stack = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 3))
    assert largest_unit(stack, ("Linear",)) == 12 and largest_unit(stack, ("Block",)) == 0
    assert logits_bytes(4096, 151_936, 2048, 2, LossConfig()) < logits_bytes(
        4096, 151_936, 2048, 2, LossConfig(chunked=False)
    )
    gpt2 = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=2, vocab_size=100)
    eager = decoder_activation_bytes(gpt2, 2, 32, 2, False, 4, eager=True)
    assert (
        eager["activations"]
        > decoder_activation_bytes(gpt2, 2, 32, 2, False, 4, False)["activations"]
        and eager["logits"] == 2 * 32 * 100 * 14
    )
    shipped = {"example-org/shipped-gpt2": {"model_type": "gpt2", "n_layer": 3}}
    assert architecture_config("example-org/shipped-gpt2", shipped)[0].n_layer == 3
    print(setup_lines(cfg, "4,096 tokens"))
    print("core.commands.estimate: ok")
