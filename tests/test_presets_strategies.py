"""Every preset of every task x every ``trainer.strategy`` a user can type, on 2 CPU ranks: each
either trains (2 optimizer steps) or exits 2 with a message naming the key, never a traceback and
never exit 1.

- Hub presets (real model names) stop offline with the hub message; their other settings
  (optimizer, quantization, precision, FSDP settings) are also run with the task's tiny model
  swapped in (the tiny preset's ``model`` group as overrides).
- Refusals that are pure config checks (the machine, the strategy, the optimizer under FSDP2) are
  checked in this process through the real ``train`` command, with ``Fabric.launch`` made to fail
  the test should anything get as far as launching.
- The combinations that should train are reduced to their distinct effective settings (what can
  interact with the strategy: optimizer, precision, quantization, FSDP settings, frozen parts,
  checkpointing) and run as 2 ranks of one driver process pair (tests/presets_strategies_driver.py):
  the real ``train`` command of each, one after the other; the single-process (``auto``, one
  device) ones run in this process.
"""

from __future__ import annotations

import importlib
import json
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.config.loader import load_config, read_yaml, resolve_preset, to_dict
from core.errors import UserError
from core.parallel.strategy import STRATEGIES, check_machine, resolve_precision
from core.testing.toy import child_env

pytestmark = pytest.mark.faults  # the fault suite (issue 20): uv run pytest -m faults

DRIVER = Path(__file__).parent / "presets_strategies_driver.py"


@dataclass
class TaskInfo:
    """What the walk needs of a task package."""

    package: str
    config: str  # "module:Class"
    data: list[str] = field(default_factory=list)  # quick data settings
    extra_tiny: list[str] = field(default_factory=list)  # beyond the tiny preset's model group

    @property
    def cli(self) -> Any:
        return importlib.import_module(f"{self.package}.cli")

    @property
    def presets_dir(self) -> Path:
        cli = self.cli
        return Path(getattr(cli, "PRESETS_DIR", None) or cli.PRESETS)

    @property
    def config_cls(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)

    def presets(self) -> list[str]:
        return sorted(p.stem for p in self.presets_dir.glob("*.yaml"))

    def is_hub(self, cfg: Any) -> bool:
        """Whether the preset's model comes from the Hugging Face Hub."""
        if self.package == "summarization":
            return cfg.model.init == "pretrained"
        return cfg.model.name != "tiny"

    def tiny_model(self) -> list[str]:
        """Overrides that swap in the tiny preset's model (its whole ``model`` group)."""
        model = read_yaml(resolve_preset("tiny", self.presets_dir))["model"]
        return [*flatten(model, "model"), *self.extra_tiny]


TASKS = {
    "lora_llm": TaskInfo(
        "lora_llm",
        "lora_llm.config:LoraLLMConfig",
        ["data.max_samples=12", "data.val_size=4", "data.max_length=128"],
        # gpt2 / phi2 name their own projections; the tiny Llama has q/k/v/o
        ["lora.target_modules=[q_proj,k_proj,v_proj,o_proj]"],
    ),
    "summarization": TaskInfo(
        "summarization",
        "summarization.config:SummarizationConfig",
        ["data.max_train_samples=8", "data.max_val_samples=2", "data.max_source_length=64"],
    ),
    "qwen_vl": TaskInfo(
        "qwen_vl",
        "qwen_vl.config:QwenVLConfig",
        ["data.max_length=256"],
    ),
}

QUICK = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "trainer.max_epochs=null",
    "trainer.max_time=null",
    "trainer.batch_size=2",
    "trainer.eval_batch_size=2",
    "trainer.accumulate_grad_batches=1",
    "trainer.num_workers=0",
    "trainer.log_every_n_steps=1",
    "logger.progress_bar=false",
    "logger.plot=false",
]
"""Every run: 2 optimizer steps of 2 samples per rank on the CPU, quietly."""


def flatten(value: Any, prefix: str) -> list[str]:
    """``key=value`` overrides of a nested mapping."""
    if isinstance(value, dict):
        return [o for k, v in value.items() for o in flatten(v, f"{prefix}.{k}")]
    if isinstance(value, list):
        return [f"{prefix}=[{','.join(str(v) for v in value)}]"]
    return [f"{prefix}={'null' if value is None else value}"]


@dataclass
class Case:
    """One preset x strategy (x model swap) of one task."""

    task: str
    preset: str
    strategy: str
    tiny_model: bool  # a hub preset with the tiny model swapped in
    overrides: list[str]

    @property
    def id(self) -> str:
        swap = "+tiny-model" if self.tiny_model else ""
        return f"{self.task}:{self.preset}{swap}:{self.strategy}"


def config_of(case: Case) -> Any:
    info = TASKS[case.task]
    return load_config(info.config_cls, case.preset, case.overrides, info.presets_dir)


def cases(devices: int = 2) -> list[Case]:
    """Every task x preset x strategy; hub presets as they are and with the tiny model."""
    out = []
    for task, info in TASKS.items():
        for preset in info.presets():
            base = load_config(info.config_cls, preset, [], info.presets_dir)
            variants = [False, True] if info.is_hub(base) else [False]
            for swap in variants:
                for strategy in STRATEGIES:
                    overrides = [
                        *(info.tiny_model() if swap else []),
                        *QUICK,
                        *info.data,
                        f"trainer.strategy={strategy}",
                        f"trainer.devices={devices}",
                    ]
                    out.append(Case(task, preset, strategy, swap, overrides))
    return out


def refusal(case: Case) -> str | None:
    """The message of the pure config checks ``train`` makes before launching (the config's own
    checks when it is loaded, then the machine, strategy, optimizer and precision), or None."""
    from core.nn.optim import check_strategy
    from core.parallel import fsdp

    try:
        cfg = config_of(case)
        check_machine(cfg.trainer)
        check_strategy(cfg)
        resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
        if cfg.trainer.strategy == "fsdp":
            reason = fsdp.unsupported_reason(cfg, "cpu")
            if reason:
                return reason
    except UserError as err:
        return str(err)
    return None


def effective_key(case: Case) -> str:
    """The settings of a case that can interact with the strategy: equal keys, one run."""
    cfg = config_of(case)
    plain = to_dict(cfg)
    model = {
        k: v
        for k, v in plain["model"].items()
        if k
        in (
            "gradient_checkpointing",
            "encoder_mlm",
            "train_vision",
            "train_merger",
            "train_llm",
            "attn_implementation",
        )
    }
    key = {
        "task": case.task,
        "strategy": case.strategy,
        "optim": cfg.optim.name,
        "precision": resolve_precision(cfg.trainer.precision, "cpu"),
        "quant": plain.get("quant", {}).get("bits"),
        "model": model,
        "clip": cfg.trainer.gradient_clip_val,
        "fsdp": plain["fsdp"] if case.strategy == "fsdp" else None,
        "per_part_lr": [plain["model"].get(k) is not None for k in ("lr_vision", "lr_merger")],
    }
    return json.dumps(key, sort_keys=True)


def trainable(case: Case) -> bool:
    """A case that must train: its model is available offline and no config check refuses it."""
    return refusal(case) is None and not TASKS[case.task].is_hub(config_of(case))


def distinct(selected: list[Case]) -> list[Case]:
    """One case per effective key (the first in walk order)."""
    seen: dict[str, Case] = {}
    for case in selected:
        seen.setdefault(effective_key(case), case)
    return list(seen.values())


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Per task, the data overrides that point at small test data and temporary caches."""
    from qwen_vl.synth import SynthSettings, write_dataset

    counting = tmp_path_factory.mktemp("counting")
    write_dataset(counting, SynthSettings(n_train=8, n_dev=4, seed=3))
    cache = tmp_path_factory.mktemp("token-cache")
    return {
        "lora_llm": [],
        "summarization": [f"data.cache_dir={cache}"],
        "qwen_vl": [
            f"data.train_file={counting / 'train.jsonl'}",
            f"data.val_file={counting / 'dev.jsonl'}",
        ],
    }


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before any process is launched: launching fails the test."""
    from lightning.fabric import Fabric

    def launch(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("this configuration got as far as launching its processes")

    monkeypatch.setattr(Fabric, "launch", launch)


def test_every_case_that_cannot_train_here_exits_2(
    tmp_path, capsys, monkeypatch, data_dirs, no_launch
):
    """The half of the walk that cannot train on this machine: config refusals exit 2 before
    launch, hub presets stop with the offline message."""
    config_refusals_exit_2_before_launch(tmp_path, capsys)
    monkeypatch.undo()  # the hub presets' check comes after launch (one process, in here)
    hub_presets_stop_offline_with_the_hub_message(tmp_path, capsys, monkeypatch, data_dirs)


def config_refusals_exit_2_before_launch(tmp_path: Path, capsys: Any) -> None:
    """Every case a pure config check refuses: ``train`` exits 2, the message names the key, no
    traceback, nothing launched (one case per distinct message and task)."""
    walk = cases()
    presets = {(c.task, c.preset) for c in walk}
    assert presets >= {("lora_llm", "tiny"), ("summarization", "bart_large_cnn")}
    assert {c.strategy for c in walk} == set(STRATEGIES)
    assert {(c.task, c.preset) for c in walk if c.tiny_model} == {
        ("lora_llm", "gpt2"),
        ("lora_llm", "phi2"),
        ("lora_llm", "tinyllama"),
        ("qwen_vl", "qwen2_5_vl_3b"),
        ("qwen_vl", "qwen2_5_vl_7b"),
        ("summarization", "bart_base"),
        ("summarization", "bart_large_cnn"),
        ("summarization", "t5_small"),
    }
    checked: dict[tuple[str, str], str] = {}
    for case in cases():
        message = refusal(case)
        if message is None or (case.task, message) in checked:
            continue
        checked[(case.task, message)] = case.id
        cli = TASKS[case.task].cli
        code = cli.train(["-c", case.preset, *case.overrides, f"run.root={tmp_path / 'runs'}"])
        err = capsys.readouterr().err
        assert code == 2, f"{case.id}: exit {code}\n{err}"
        assert "Traceback" not in err and err.lower().startswith("error: "), f"{case.id}: {err}"
        assert any(k in err for k in ("trainer.strategy", "optim.name")), f"{case.id}: {err}"
    messages = "\n".join(m for _, m in checked)
    assert "DeepSpeed runs on CUDA GPUs only" in messages
    assert "paged_adamw_8bit (a bitsandbytes optimizer) cannot update" in messages
    # every lora_llm preset (all paged_adamw_8bit) is refused under fsdp, before launch
    lora_fsdp = [c for c in cases() if c.task == "lora_llm" and c.strategy == "fsdp"]
    assert lora_fsdp and all(refusal(c) for c in lora_fsdp)


def hub_presets_stop_offline_with_the_hub_message(
    tmp_path: Path, capsys: Any, monkeypatch: Any, data_dirs: dict[str, list[str]]
) -> None:
    """A hub preset as it is (with its own strategy, on one device) exits 2 with the message
    that names model.name and the offline preset."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = [
        c
        for c in cases(devices=1)
        if c.strategy in ("auto", "ddp", "fsdp")
        and not c.tiny_model
        and refusal(c) is None
        and TASKS[c.task].is_hub(config_of(c))
    ]
    assert len({(c.task, c.preset) for c in hub}) == 8
    for case in hub:
        if case.strategy != "auto":
            continue  # the check comes before the strategy matters; one per preset
        cli = TASKS[case.task].cli
        argv = [
            "-c",
            case.preset,
            *case.overrides,
            *data_dirs[case.task],
            f"run.root={tmp_path / 'runs'}",
        ]
        code = cli.train(argv)
        err = capsys.readouterr().err
        assert code == 2, f"{case.id}: exit {code}\n{err}"
        assert "Traceback" not in err, err
        assert "the Hugging Face Hub is not reachable" in err and "-c tiny" in err, err


@pytest.mark.slow
def test_single_process_runs_two_steps_for_every_distinct_setting(tmp_path, data_dirs, capsys):
    """``trainer.strategy=auto`` on one device (the single process): every distinct effective
    setting of the presets (hub presets with the tiny model) trains 2 optimizer steps."""
    selected = distinct([c for c in cases(devices=1) if c.strategy == "auto" and trainable(c)])
    assert len(selected) >= 5
    for i, case in enumerate(selected):
        root = tmp_path / f"runs{i}"
        code = TASKS[case.task].cli.train(
            ["-c", case.preset, *case.overrides, *data_dirs[case.task], f"run.root={root}"]
        )
        err = capsys.readouterr().err
        assert code == 0, f"{case.id}: exit {code}\n{err}"
        summary = json.loads(next(root.glob("*/summary.json")).read_text())
        assert summary["status"] == "completed" and summary["global_step"] == 2, case.id


REFUSED_AFTER_LAUNCH = {
    # The task's own check (summarization.task: the MLM head is read outside the model's
    # forward, which FSDP2 shards) runs in the ranks; exit 2 with the key named.
    "summarization:small:fsdp": "model.encoder_mlm=0.15",
}
"""Cases that exit 2 from a check made after launch (the message part each must show)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_train_every_distinct_setting_or_exit_2(tmp_path, data_dirs):
    """``ddp``, ``fsdp`` and ``auto`` on 2 CPU ranks: every distinct effective setting that no
    config check refuses runs the real ``train`` (2 optimizer steps, status completed) or exits 2
    with a message (a check made after launch); never a traceback, never exit 1."""
    multi = [c for c in cases() if c.strategy in ("ddp", "fsdp") and trainable(c)]
    # auto with 2 devices is Fabric's DDP: once per task
    auto = {c.task: c for c in reversed(cases()) if c.strategy == "auto" and trainable(c)}
    selected = distinct(multi) + list(auto.values())
    plan = []
    for i, case in enumerate(selected):
        argv = [
            "-c",
            case.preset,
            *case.overrides,
            *data_dirs[case.task],
            f"run.root={tmp_path / f'runs{i}'}",
        ]
        plan.append({"id": case.id, "package": case.task, "argv": argv})
    (tmp_path / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, str(DRIVER), str(tmp_path / "plan.json")],
            env=child_env(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                WORLD_SIZE="2",
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                NODE_RANK="0",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for proc in ranks:
            outputs.append(proc.communicate(timeout=900))
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
    results = {
        r["id"]: r
        for r in (
            json.loads(line.removeprefix("RESULT "))
            for line in outputs[0][0].splitlines()
            if line.startswith("RESULT ")
        )
    }
    report = "\n".join(
        f"{k}: exit {v['rc']} {v['stderr'].strip().splitlines()[-1][:160] if v['rc'] else ''}"
        for k, v in results.items()
    )
    print(report)  # the table of the walk (pytest -s)
    assert len(results) == len(plan), f"{report}\nrank 0:\n{outputs[0][1][-6000:]}"
    for i, item in enumerate(plan):
        result = results[item["id"]]
        assert result["rc"] in (0, 2), f"{item['id']}: {result['rc']}\n{result['stderr']}"
        assert "Traceback" not in result["stderr"], result["stderr"]
        if result["rc"] == 2:
            assert result["stderr"].lower().startswith("error: "), result["stderr"]
            assert item["id"] in REFUSED_AFTER_LAUNCH, f"{item['id']} did not train:\n{report}"
            assert REFUSED_AFTER_LAUNCH[item["id"]] in result["stderr"], result["stderr"]
            continue
        summary = json.loads(next((tmp_path / f"runs{i}").glob("*/summary.json")).read_text())
        assert summary["status"] == "completed" and summary["global_step"] == 2, item["id"]
    assert all(proc.returncode == 0 for proc in ranks), outputs[1][1][-4000:]
