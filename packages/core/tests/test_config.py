"""Configs: typed values, overrides, presets, documentation, and the exit-code-2 contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.commands.train import train_command
from core.config.loader import iter_keys, load_config, parse_overrides, to_yaml
from core.config.schema import TrainConfig
from core.errors import ConfigError
from core.testing.toy import ToyConfig, ToyTask

CONTRACT_KEYS = [
    "run.root",
    "run.name",
    "run.dir",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.precision",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "trainer.log_every_n_steps",
    "trainer.val_every_n_steps",
    "trainer.ckpt_every_n_steps",
    "trainer.seed",
    "trainer.deterministic",
    "trainer.resume",
    "logger.wandb",
    "debug.shapes",
]


def test_contract_keys_exist_and_every_field_is_documented():
    keys = {key: doc for key, _, doc in iter_keys(TrainConfig)}
    assert set(CONTRACT_KEYS) <= set(keys)
    undocumented = [k for k, doc in keys.items() if not doc.strip()]
    assert undocumented == []


def test_overrides_are_typed_and_attribute_access_works():
    cfg = load_config(
        TrainConfig,
        overrides=[
            "trainer.max_steps=100",
            "optim.lr=1e-4",
            "optim.betas=[0.8, 0.95]",
            "trainer.devices=auto",
            "trainer.deterministic=warn",
            "run.dir=null",
            "run.root=some/where",
        ],
    )
    assert cfg.trainer.max_steps == 100 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.optim.lr == pytest.approx(1e-4)  # YAML reads "1e-4" as text; we convert it
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.trainer.devices == "auto" and cfg.trainer.deterministic == "warn"
    assert cfg.run.root == Path("some/where")


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer.max_stepz=3",
            "Unknown config key 'trainer.max_stepz'. Did you mean 'trainer.max_steps'?",
        ),
        ("optim.max_steps=3", "Did you mean 'trainer.max_steps'?"),
        (
            "trainer.max_steps=many",
            "Config key 'trainer.max_steps' got 'many' (str): expected int | null.",
        ),
        (
            "trainer.precision=fp17",
            "Config key 'trainer.precision' got 'fp17' (str): expected one of",
        ),
        ("trainer.max_steps=0", "Config key 'trainer.max_steps' must be at least 1, got 0."),
        ("optim.warmup_ratio=1.5", "Config key 'optim.warmup_ratio' must be in [0, 1), got 1.5."),
        ("trainer=3", "Config key 'trainer' is a group of settings"),
        ("run.name=a/b", "Config key 'run.name' = 'a/b' contains '/'"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, overrides=[override])
    assert message in str(err.value)


def test_preset_file_then_overrides_win(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("trainer:\n  max_steps: 7\n  batch_size: 3\noptim:\n  lr: 0.5\n")
    cfg = load_config(TrainConfig, preset, ["optim.lr=0.25"])
    assert (cfg.trainer.max_steps, cfg.trainer.batch_size, cfg.optim.lr) == (7, 3, 0.25)
    with pytest.raises(ConfigError, match="Unknown preset 'nope'"):
        load_config(TrainConfig, "nope", [], presets_dir=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(TrainConfig, bad)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(
        ToyConfig, overrides=["trainer.max_steps=5", "model.n_embd=16", "optim.betas=[0.5, 0.6]"]
    )
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(ToyConfig, path) == cfg


def test_parse_overrides_rejects_items_without_equals():
    with pytest.raises(ConfigError, match="is not of the form key=value"):
        parse_overrides(["trainer.max_steps"])


def _train(argv):
    return train_command(
        argv,
        prog="toy-train",
        description="toy",
        config_cls=ToyConfig,
        presets_dir=None,
        make_task=ToyTask,
    )


def test_cli_exit_code_2_with_one_paragraph_and_no_traceback(capsys, tmp_path):
    assert _train(["trainer.max_stepz=3", f"run.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: Unknown config key 'trainer.max_stepz'. Did you mean 'trainer.max_steps'?"
    )
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "a config error must not create a run folder"
    assert _train(["-c", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _train(["max_steps"]) == 2
    assert "is not an override of the form key=value" in capsys.readouterr().err


def test_cli_print_config_and_help(capsys):
    assert _train(["--print-config", "trainer.max_steps=9"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 9" in out and "loss_normalization: token" in out
    with pytest.raises(SystemExit) as exit_info:
        _train(["--help"])
    assert exit_info.value.code == 0
    assert "presets:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _train(["--help-keys"])
    assert "trainer.accumulate_grad_batches (int, default 1)" in capsys.readouterr().out
