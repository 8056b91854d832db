"""The command-line contract every task package keeps.

    train [-c PRESET|FILE.yaml] [key=value ...] [--print-config] [--help]

- ``-c`` picks a preset shipped in the package (``--help`` lists them) or a YAML file.
- ``key=value`` overrides any config key (``trainer.max_steps=100``, ``optim.lr=1e-4``).
- ``--print-config`` prints the resolved config as YAML and exits.
- ``--help-keys`` lists every key with its type, default and documentation.
- A mistake the user can fix (unknown key, wrong type, missing file, malformed data) prints one
  paragraph and exits with code 2; no traceback.

Task packages declare a :class:`core.commands.spec.TaskSpec` in their ``cli.py``, whose ``train``
calls
:func:`train_command`; the second half of this module is what ``evaluate`` and ``infer`` share
(:mod:`core.commands.model_io` builds the ``evaluate`` command from it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.config.loader import describe_keys, list_presets, load_config, to_yaml

# fail and user_errors_exit_2 live in core.errors; imported here too so that code importing
# them from core.commands.train keeps working.
from core.errors import ConfigError, UserError, fail, user_errors_exit_2  # noqa: F401


def train_parser(
    prog: str,
    description: str,
    config_cls: type,
    presets_dir: Path | None,
    default_preset: str | None,
) -> argparse.ArgumentParser:
    """The ``train`` argument parser of a task (presets listed in ``--help``)."""
    presets = list_presets(presets_dir)
    epilog = (
        f"presets: {', '.join(presets) or '(none)'}"
        + (f" (default: {default_preset})" if default_preset else "")
        + "\n\nexamples:\n"
        + f"  {prog} -c {default_preset or (presets[0] if presets else 'FILE.yaml')} "
        "trainer.max_steps=100 optim.lr=1e-4\n"
        + f"  {prog} -c my_settings.yaml run.name=ablation-1 --print-config\n"
        + f"  {prog} run.dir=latest trainer.resume=auto   # continue the newest run\n\n"
        + "Every key: --help-keys. Runs go to run.root (default runs/)."
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-c", "--config", metavar="PRESET|FILE", default=None, help="a preset name or a YAML file"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "--help-keys",
        action="store_true",
        help="list every config key with type, default and meaning",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. trainer.max_steps=100",
    )
    return parser


def parse_train_args(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    config_cls: type,
    presets_dir: Path | None,
    default_preset: str | None = None,
    task: str | None = None,
) -> tuple[Any, argparse.Namespace]:
    """Parse ``train`` arguments into a validated config.

    ``run.dir`` naming an earlier run of this task (a path, or ``latest``) continues that run
    with *its own* ``config.yaml`` plus the overrides given; with ``-c`` as well, the preset and
    overrides must give that same config (else the differing keys are named).

    Returns:
        ``(config, namespace)``; the namespace says whether to only print the config.

    Raises:
        UserError: unknown preset / key, wrong value, a ``-c`` that contradicts the continued run.
        SystemExit: ``--help`` or an unknown flag (argparse, exit code 2).
    """
    parser = train_parser(prog, description, config_cls, presets_dir, default_preset)
    # Intermixed: `train trainer.max_steps=5 -c tiny x=y` works as well as `train -c tiny ...`.
    args = parser.parse_intermixed_args(argv)
    if args.help_keys:
        print(describe_keys(config_cls))
        raise SystemExit(0)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(
            f"'{bad[0]}' is not an override of the form key=value (e.g. trainer.max_steps=100); "
            "presets go after -c."
        )
    try:
        cfg = load_config(config_cls, args.config or default_preset, args.overrides, presets_dir)
    except ConfigError:
        owner = config_owner(args.config, task) if args.config and task else None
        if owner is None:
            raise
        name, why = owner
        raise UserError(
            f"-c {args.config}: this config is for {name} ({why}), not for {task}: run it with "
            f"`uv run --package {name} train -c {args.config} ...`."
        ) from None
    return continued_config(cfg, args, config_cls, presets_dir, task), args


def continued_config(
    cfg: Any, args: argparse.Namespace, config_cls: type, presets_dir: Path | None, task: str | None
) -> Any:
    """``cfg``, or, when ``run.dir`` names an earlier run, that run's own ``config.yaml`` with
    the overrides (and ``run.dir`` set to the run).

    Raises:
        UserError: ``-c`` and the overrides give another config than the continued run's.
    """
    run = continued_run(cfg, task)
    if run is None:
        return cfg
    saved = load_config(config_cls, run / "config.yaml", args.overrides, presets_dir)
    if args.config is not None:
        differ = config_differences(cfg, saved)
        if differ:
            shown = "; ".join(f"{k}: {a!r} (-c) vs {b!r} (run)" for k, a, b in differ[:5])
            raise UserError(
                f"run.dir continues '{run}' with its own config.yaml, but -c {args.config} "
                "and the overrides "
                f"differ from it in {len(differ)} key(s): {shown}. Drop -c to continue the "
                "run as it was "
                "(give changes as key=value), or start a new run without run.dir."
            )
    saved.run.dir = run
    return saved


def task_configs() -> dict[str, tuple[type, Path]]:
    """``{task: (root config class, presets folder)}`` of every installed task.

    Tasks are the ``core.tasks`` entry points (:func:`core.commands.launcher.installed_tasks`); each
    names
    its commands module, whose ``SPEC`` (:class:`core.commands.spec.TaskSpec`) names them; failing
    that,
    the module imports the task's root config (the one subclass of
    :class:`core.config.schema.TrainConfig` there); the presets sit in ``presets/`` beside it.
    A task whose module cannot be imported is left out.
    """
    import importlib

    from core.commands.launcher import installed_tasks
    from core.config.schema import TrainConfig

    found: dict[str, tuple[type, Path]] = {}
    for name, entry in installed_tasks().items():
        try:
            module = importlib.import_module(entry.value)
        except Exception:  # noqa: BLE001 - a broken package is not this message's concern
            continue
        spec = getattr(module, "SPEC", None)  # a core.commands.spec.TaskSpec
        if spec is not None:
            found[name] = (spec.config_cls, Path(spec.presets))
            continue
        classes = [
            v
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, TrainConfig) and v is not TrainConfig
        ]
        if classes and getattr(module, "__file__", None):
            found[name] = (classes[0], Path(module.__file__).parent / "presets")
    return found


def config_owner(source: str | Path, task: str) -> tuple[str, str] | None:
    """The other task a ``-c`` preset or YAML file belongs to, and how that is known.

    A ``config.yaml`` in a run folder: the task in the run's ``manifest.json``. Any other YAML
    file that this task's config class does not take: the one installed task whose config class
    takes it whole, else the one whose top-level groups hold every group of the file (a file
    with a mistake of its own as well). A preset name: the installed task that ships it, when
    this one does not. Tasks and their config classes come from the ``core.tasks`` entry points
    (:func:`task_configs`).

    Returns:
        ``(task, reason)``, or None when no other task fits (the config error stands).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return file_owner(path, task)
    if "/" in str(source) or str(source).endswith((".yaml", ".yml")):
        return None
    configs = task_configs()
    if task in configs and (configs[task][1] / f"{source}.yaml").is_file():
        return None
    shipping = sorted(n for n, (_, d) in configs.items() if (d / f"{source}.yaml").is_file())
    if len(shipping) == 1 and shipping[0] != task:
        return shipping[0], f"'{source}' is a preset of {shipping[0]}"
    return None


def file_owner(path: Path, task: str) -> tuple[str, str] | None:
    """:func:`config_owner` of a YAML file (see there)."""
    import dataclasses

    import yaml

    from core.run.folder import is_run_folder, run_task

    if is_run_folder(path.parent):
        owner = run_task(path.parent)
        if owner and owner != task and owner in task_configs():
            return owner, f"the run '{path.parent}' was trained by {owner}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict) or not data:
        return None
    keys = set(map(str, data))
    configs = task_configs()

    def groups(name: str) -> set[str]:
        return {f.name for f in dataclasses.fields(configs[name][0])}

    def loads(name: str) -> bool:
        try:
            load_config(configs[name][0], path, [], configs[name][1])
        except Exception:  # noqa: BLE001 - any failure means "not this task's config"
            return False
        return True

    if task in configs and loads(task):
        return None  # this task's own config: the mistake is in an override
    others = sorted(n for n in configs if n != task)
    own_groups = groups(task) if task in configs else set()
    # The task whose config class takes the whole file; failing that, the one whose groups
    # hold every group of the file when this task's do not (the file has a mistake too).
    by_load = [n for n in others if loads(n)]
    if len(by_load) == 1:
        return by_load[0], f"it is a valid {by_load[0]} config"
    by_groups = [] if keys <= own_groups else [n for n in others if keys <= groups(n)]
    if len(by_groups) == 1:
        extra = ", ".join(sorted(keys - own_groups))
        return by_groups[0], f"its group(s) {extra} belong to {by_groups[0]}"
    return None


def continued_run(cfg: Any, task: str | None) -> Path | None:
    """The earlier run folder that ``run.dir`` names (``latest``: this task's newest), or None
    when ``run.dir`` is unset or names a new or empty folder.

    Raises:
        UserError: ``run.dir`` is a file, a folder of other files, or another task's run;
            ``latest`` with no run of this task.
    """
    from core.run.folder import check_run_dir, is_run_folder, latest_run_dir

    if cfg.run.dir is None:
        return None
    if str(cfg.run.dir) == "latest":
        found = latest_run_dir(cfg.run.root, cfg.run.name, task)
        if found is None:
            raise UserError(
                f"run.dir=latest found no run{f' of the {task} task' if task else ''} under "
                f"run.root='{cfg.run.root}'"
                + (f" named '*_{cfg.run.name}'" if cfg.run.name else "")
                + "; start a new run without run.dir, or give run.dir=PATH."
            )
        return found
    path = Path(cfg.run.dir)
    check_run_dir(path, task)
    return path if is_run_folder(path) else None


# Keys that may differ between a run's config.yaml and the command that continues it.
CONTINUE_KEYS = ("run.dir", "trainer.resume", "trainer.resume_changed_data")


def config_differences(given: Any, saved: Any) -> list[tuple[str, Any, Any]]:
    """``(key, given value, saved value)`` for every key where two configs differ, except
    :data:`CONTINUE_KEYS`; ``trainer.precision=auto`` matches whatever it was resolved to."""
    from core.config.loader import to_dict

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    a, b = flat(to_dict(given)), flat(to_dict(saved))
    differ = []
    for key in a:
        if key in CONTINUE_KEYS or a[key] == b.get(key):
            continue
        if key == "trainer.precision" and a[key] == "auto":
            continue
        differ.append((key, a[key], b.get(key)))
    return differ


@user_errors_exit_2
def train_command(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    config_cls: type,
    presets_dir: Path | None,
    make_task: Callable[[Any], Any],
    default_preset: str | None = None,
    task: str | None = None,
) -> int:
    """Run a task's ``train`` command: parse, then fit with :class:`core.engine.trainer.Trainer`.

    Args:
        argv: arguments after the program name (default ``sys.argv[1:]``).
        prog: program name for help.
        description: one-line description for help.
        config_cls: the task's root config class.
        presets_dir: folder of the package's YAML presets.
        make_task: builds the task from the config.
        default_preset: preset used when ``-c`` is not given.
        task: the task's name (``run.dir`` must be a run of it; ``latest`` looks for it).

    Returns:
        Exit code: 0 when training completed or was interrupted by a signal (checkpoint written).
    """
    cfg, args = parse_train_args(
        argv,
        prog=prog,
        description=description,
        config_cls=config_cls,
        presets_dir=presets_dir,
        default_preset=default_preset,
        task=task,
    )
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from core.engine.trainer import Trainer  # heavy imports only when training

    logging.captureWarnings(True)
    result = Trainer(
        cfg, make_task(cfg), argv=[prog, *(sys.argv[1:] if argv is None else argv)]
    ).fit()
    if result.global_rank == 0:
        print(f"{result.status}: {result.run_dir}", file=sys.stderr)
        if result.status == "interrupted":
            print(f"resume with: {resume_command(task, result.run_dir)}", file=sys.stderr)
    return 0


def resume_command(task: str | None, run_dir: Path) -> str:
    """The command that continues a run (its own config, from its newest checkpoint)."""
    import shlex

    package = f"uv run --package {task} " if task else ""
    return f"{package}train run.dir={shlex.quote(str(run_dir))}"


# --------------------------------------------------------------------------------------------
# The shape every task's evaluate / infer command shares
# --------------------------------------------------------------------------------------------


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    model_help: str,
    data_help: str,
    split_help: str | None = None,
    prompt_help: str | None = None,
    out_help: str,
) -> None:
    """The common flags of ``evaluate`` and ``infer`` (aliases keep the older spellings working)::

        --model DIR  (--data FILE | --split NAME | --prompt TEXT)  [--out FILE] [--overwrite]
        [-c PRESET|FILE] [key=value ...]

    Args:
        parser: the command's parser (the task adds its own flags too).
        model_help: what ``--model`` takes.
        data_help: what ``--data`` takes.
        split_help: what ``--split`` takes (None: no ``--split``).
        prompt_help: what ``--prompt`` takes (None: no ``--prompt``).
        out_help: what ``--out`` writes.
    """
    parser.add_argument(
        "--model",
        "--adapter",
        dest="model",
        type=Path,
        required=True,
        metavar="DIR",
        help=model_help,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", "--input", dest="data", type=Path, metavar="FILE", help=data_help)
    if split_help is not None:
        source.add_argument("--split", metavar="NAME", help=split_help)
    if prompt_help is not None:
        source.add_argument("--prompt", "--text", dest="prompt", metavar="TEXT", help=prompt_help)
    add_out_arguments(parser, out_help)
    parser.add_argument(
        "-c",
        "--config",
        metavar="PRESET|FILE",
        default=None,
        help="config preset or YAML (default: the config.yaml of the run that wrote --model)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.devices=2"
    )


def add_out_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """``--out FILE`` (also ``--output``; default None) and ``--overwrite`` (replace an existing
    ``--out`` file; see :func:`core.run.outputs.guard_file`)."""
    parser.add_argument("--out", "--output", dest="out", type=Path, metavar="FILE", help=out_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def parse_model_command(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse ``argv`` (flags and ``key=value`` overrides in any order).

    Raises:
        UserError: an override without ``=``.
    """
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(
            f"'{bad[0]}' is not an option of {parser.prog} nor an override of the form key=value."
        )
    return args


def run_of_model(model_dir: Path) -> Path | None:
    """The run folder whose ``final/`` (or checkpoint) ``model_dir`` is, or None."""
    from core.run.folder import is_run_folder

    for folder in (Path(model_dir).parent, Path(model_dir).parent.parent.parent):
        if is_run_folder(folder):
            return folder
    return None


def config_for_model(
    model_dir: Path,
    preset: str | None,
    overrides: Sequence[str],
    config_cls: type,
    presets_dir: Path | None,
    default_preset: str | None,
) -> Any:
    """The config of a command that uses a trained model: ``-c`` when given, else the
    ``config.yaml`` of the run that wrote ``model_dir``, else the default preset; then the
    overrides."""
    source: str | Path | None = preset
    run = run_of_model(model_dir)
    if source is None and run is not None:
        source = run / "config.yaml"
    return load_config(config_cls, source or default_preset, list(overrides), presets_dir)


def describe_model(folder: Path) -> str | None:
    """What a model folder holds, in words (``a LoRA adapter of gpt2``, ``a bart model
    (BartForConditionalGeneration)``), or None when it holds no model description."""
    import json

    folder = Path(folder)
    for name, kind in (("adapter_config.json", "adapter"), ("config.json", "model")):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if kind == "adapter":
            base = data.get("base_model_name_or_path") or "an unnamed base"
            return f"a {data.get('peft_type', 'PEFT')} adapter of {base}"
        archs = data.get("architectures") or []
        model_type = data.get("model_type") or "unknown"
        return f"a {model_type} model" + (f" ({', '.join(map(str, archs))})" if archs else "")
    return None


def model_owner(model_dir: Path) -> tuple[str, Path] | None:
    """The task that trained ``model_dir`` and its run folder, when ``model_dir`` is a run
    folder, or its ``final/`` or a checkpoint in it (from the run's ``manifest.json``)."""
    from core.run.folder import is_run_folder, run_task

    model_dir = Path(model_dir)
    run = model_dir if is_run_folder(model_dir) else run_of_model(model_dir)
    if run is None:
        return None
    owner = run_task(run)
    return (owner, run) if owner else None


def check_model_dir(
    model_dir: Path,
    marker: str = "config.json",
    what: str = "a folder written by save_pretrained",
    task: str | None = None,
    fits: Callable[[dict], bool] | None = None,
) -> Path:
    """``model_dir`` as an existing model folder holding ``marker``.

    Args:
        model_dir: ``--model``.
        marker: the file a model of this task has.
        what: what this task expects, for messages.
        task: this task's name: a model of another task's run is named as such.
        fits: whether the ``config.json`` of a model folder is a model this task can use (a
            bare folder of another architecture is named with what it holds).

    Raises:
        UserError: missing, a file, a model of another task, or without ``marker``.
    """
    model_dir = Path(model_dir).expanduser()
    if not model_dir.exists():
        raise UserError(
            f"Model folder '{model_dir}' (--model) does not exist; give {what}, e.g. "
            "runs/001_.../final."
        )
    if not model_dir.is_dir():
        raise UserError(f"--model '{model_dir}' is a file; give {what} (a run's final/ folder).")
    owner = model_owner(model_dir) if task else None
    if owner is not None and owner[0] != task:
        name, run = owner
        raise UserError(
            f"--model '{model_dir}' was trained by the {name} task (run '{run}', its "
            f"manifest.json), not by {task}: evaluate it with `uv run --package {name} "
            f"evaluate --model {model_dir}` (or its infer)."
        )
    held = describe_model(model_dir)
    if not (model_dir / marker).is_file():
        if owner is not None and owner[1] == model_dir:
            raise UserError(
                f"--model '{model_dir}' is a run folder; give its model, e.g. "
                f"{model_dir / 'final'}."
            )
        raise UserError(
            f"--model '{model_dir}' has no {marker}"
            + (f" (it holds {held})" if held else "")
            + f"; give {what} (a run's final/ folder)."
        )
    if fits is not None and task and owner is None:
        check_fits(model_dir, fits, held, task, what)
    return model_dir


def check_fits(
    model_dir: Path, fits: Callable[[dict], bool], held: str | None, task: str, what: str
) -> None:
    """Refuse a bare model folder whose ``config.json`` is a model ``task`` cannot use.

    Raises:
        UserError: ``fits`` says no (the folder's model named as ``held``).
    """
    import json

    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and not fits(config):
        raise UserError(
            f"--model '{model_dir}' holds {held}, which the {task} task cannot use; give {what}."
        )


def data_inputs(cfg: Any) -> list[tuple[Path, str]]:
    """``(path, key)`` of every existing local file or folder the config's ``data`` group reads
    (``data.*_file``, ``data.*_files``, ``data.dataset``): inputs no output may replace.

    Only keys that name data: a split name such as ``data.hf_split=test`` is no path even when
    a folder ``test/`` happens to exist, and a cache folder is no input."""
    import dataclasses

    data = getattr(cfg, "data", None)
    if data is None or not dataclasses.is_dataclass(data):
        return []
    found: list[tuple[Path, str]] = []
    for item in dataclasses.fields(data):
        if not (item.name.endswith(("_file", "_files")) or item.name == "dataset"):
            continue
        value = getattr(data, item.name)
        for one in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(one, (str, Path)) or not str(one).strip():
                continue
            try:
                path = Path(one).expanduser()
                if path.exists():
                    found.append((path, f"data.{item.name}"))
            except (OSError, ValueError):  # a dataset id or a name that is no path
                continue
    return found


def evaluation_outputs(
    model_dir: Path,
    name: str,
    out: Path | None,
    overwrite: bool,
    inputs: Sequence[tuple[Path, str]],
    cfg: Any = None,
) -> tuple[Path | None, Path | None]:
    """Where ``evaluate`` writes its per-sample records and its scores, checked before anything
    runs.

    ``--out FILE``: the records go there (nothing else is written). Without ``--out``, for a
    model inside a run folder: ``<run>/eval/<name>.jsonl`` and ``<run>/eval/<name>.scores.json``
    (the run's own folder; a later evaluation of the same name replaces them). Otherwise nothing
    is written and the scores are only printed.

    Args:
        model_dir: the evaluated model.
        name: the evaluation's name (the split or the data file's stem).
        out: ``--out``, or None.
        overwrite: ``--overwrite``.
        inputs: ``(path, option)`` of the files the command reads (``--data``, the split's file).
        cfg: the command's config: every data file it names counts as an input too.

    Returns:
        ``(records file or None, scores file or None)``.

    Raises:
        UserError: see :func:`core.run.outputs.guard_file` / :func:`core.run.outputs.guard_folder`.
    """
    from core.run.outputs import guard_file, guard_folder

    inputs = [*inputs, *(data_inputs(cfg) if cfg is not None else [])]
    if out is not None:
        return guard_file(out, "--out", inputs, overwrite), None
    run = run_of_model(model_dir)
    if run is None:
        return None, None
    folder = guard_folder(
        run / "eval", "the run's eval folder", "evaluate", inputs, own=run / "eval"
    )
    return folder / f"{name}.jsonl", folder / f"{name}.scores.json"


def write_evaluation(
    records_path: Path | None, scores_path: Path | None, rows: Sequence[dict], scores: dict
) -> None:
    """Print the scores as one JSON line, then write what :func:`evaluation_outputs` chose.

    The scores come first: they are the result, whatever the disk does next. The run's own
    ``eval/`` folder is optional: on a read-only (archived) or full disk it is skipped with a
    note naming the path, nothing half-written is left, and the command still succeeds. An
    ``--out`` file the user asked for that cannot be written raises :class:`StorageError`
    (exit code 1, no partial file).
    """
    import json
    import shutil

    from core.run.outputs import mark_folder, write_jsonl, write_text
    from core.run.storage import StorageError

    print(json.dumps(scores, ensure_ascii=False), flush=True)
    if scores_path is not None:
        folder = scores_path.parent
        made = not folder.exists()
        written: list[Path] = []
        try:
            mark_folder(folder, "evaluate")
            if records_path is not None:
                write_jsonl(records_path, rows, "the evaluation's records")
                written.append(records_path)
            write_text(
                scores_path,
                json.dumps(scores, indent=1, ensure_ascii=False) + "\n",
                "the evaluation's scores",
            )
        except StorageError as err:
            # Remove only what this call wrote: no records without their scores.
            if made:
                shutil.rmtree(folder, ignore_errors=True)
            for path in written:
                path.unlink(missing_ok=True)
            print(
                f"note: the scores above were not saved in the run. {err} "
                "Give --out FILE to keep the records elsewhere.",
                file=sys.stderr,
            )
            return
        if records_path is not None:
            print(f"wrote {len(rows)} records to {records_path}", file=sys.stderr)
        return
    if records_path is not None:
        write_jsonl(records_path, rows, "the evaluation's records (--out)")
        print(f"wrote {len(rows)} records to {records_path}", file=sys.stderr)
