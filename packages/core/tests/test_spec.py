"""The declared task contract: every installed task package declares one
``core.commands.spec.TaskSpec``
and gets ``train`` and ``evaluate`` from it (issue 21)."""

from __future__ import annotations

import importlib

import pytest

from core.commands.launcher import installed_tasks
from core.commands.spec import TaskSpec
from core.config.schema import TrainConfig

TASKS = sorted(installed_tasks().items())


@pytest.mark.parametrize("name,entry", TASKS, ids=[n for n, _ in TASKS])
def test_every_task_declares_one_spec_that_gives_its_commands(name, entry):
    cli = importlib.import_module(entry.value)
    spec = cli.SPEC
    assert isinstance(spec, TaskSpec) and spec.name == name
    assert issubclass(spec.config_cls, TrainConfig)
    assert (spec.presets / f"{spec.default_preset}.yaml").is_file()
    # The presets constants live in the package's config module, next to the config class.
    config = importlib.import_module(spec.config_cls.__module__)
    assert config.PRESETS_DIR == spec.presets and config.DEFAULT_PRESET == spec.default_preset
    assert cli.COMMANDS["train"] == spec.train and cli.COMMANDS["evaluate"] == spec.evaluate_command
    assert spec.evaluate is not None and spec.evaluate.default_split in spec.evaluate.splits
    for text in (spec.task, spec.estimator, spec.render):
        assert text.partition(":")[0].startswith(f"{name}."), text


@pytest.mark.parametrize("name,entry", TASKS, ids=[n for n, _ in TASKS])
def test_evaluate_refuses_an_unknown_split_before_loading_anything(name, entry, tmp_path, capsys):
    spec = importlib.import_module(entry.value).SPEC
    model = tmp_path / "final"
    model.mkdir()
    (model / spec.evaluate.marker).write_text(
        '{"is_encoder_decoder": true, "model_type": "qwen2_5_vl"}', encoding="utf-8"
    )
    assert spec.evaluate_command(["--model", str(model), "--split", "no_such_split"]) == 2
    assert "--split 'no_such_split': " + spec.evaluate.split_error in capsys.readouterr().err
