"""The command-line contract every task package keeps.

    train [-c PRESET|FILE.yaml] [key=value ...] [--print-config] [--help]

- ``-c`` picks a preset shipped in the package (``--help`` lists them) or a YAML file.
- ``key=value`` overrides any config key (``trainer.max_steps=100``, ``optim.lr=1e-4``).
- ``--print-config`` prints the resolved config as YAML and exits.
- ``--help-keys`` lists every key with its type, default and documentation.
- A mistake the user can fix (unknown key, wrong type, missing file, malformed data) prints one
  paragraph and exits with code 2; no traceback.

Task packages call :func:`train_command` from their own ``cli.py``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from core.config import describe_keys, list_presets, load_config, to_yaml
from core.errors import UserError

F = TypeVar("F", bound=Callable[..., int])


def fail(message: str, code: int = 2) -> int:
    """Print ``error: <message>`` as one paragraph (one line, so paths stay copyable) to stderr
    and return ``code``."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code


def user_errors_exit_2(func: F) -> F:
    """Decorator for command entry points: ``UserError`` -> message + exit code 2, Ctrl-C -> 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return func(*args, **kwargs)
        except UserError as err:
            return fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper  # type: ignore[return-value]


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
    cfg = load_config(config_cls, args.config or default_preset, args.overrides, presets_dir)
    run = continued_run(cfg, task)
    if run is not None:
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
        cfg = saved
        cfg.run.dir = run
    return cfg, args


def continued_run(cfg: Any, task: str | None) -> Path | None:
    """The earlier run folder that ``run.dir`` names (``latest``: this task's newest), or None
    when ``run.dir`` is unset or names a new or empty folder.

    Raises:
        UserError: ``run.dir`` is a file, a folder of other files, or another task's run;
            ``latest`` with no run of this task.
    """
    from core.runs import check_run_dir, is_run_folder, latest_run_dir

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
    from core.config import to_dict

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
    """Run a task's ``train`` command: parse, then fit with :class:`core.trainer.Trainer`.

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
    from core.trainer import Trainer  # heavy imports only when training

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
    parser.add_argument("--out", "--output", dest="out", type=Path, metavar="FILE", help=out_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
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
    from core.runs import is_run_folder

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


def check_model_dir(
    model_dir: Path, marker: str = "config.json", what: str = "a folder written by save_pretrained"
) -> Path:
    """``model_dir`` as an existing model folder holding ``marker``.

    Raises:
        UserError: missing, a file, or without ``marker``.
    """
    model_dir = Path(model_dir).expanduser()
    if not model_dir.exists():
        raise UserError(
            f"Model folder '{model_dir}' (--model) does not exist; give {what}, e.g. "
            "runs/001_.../final."
        )
    if not model_dir.is_dir():
        raise UserError(f"--model '{model_dir}' is a file; give {what} (a run's final/ folder).")
    if not (model_dir / marker).is_file():
        raise UserError(
            f"--model '{model_dir}' has no {marker}; give {what} (a run's final/ folder)."
        )
    return model_dir


def evaluation_outputs(
    model_dir: Path,
    name: str,
    out: Path | None,
    overwrite: bool,
    inputs: Sequence[tuple[Path, str]],
) -> tuple[Path | None, Path | None]:
    """Where ``evaluate`` writes its per-sample records and its scores, checked before anything
    runs.

    ``--out FILE``: the records go there (nothing else is written). Without ``--out``, for a
    model inside a run folder: ``<run>/eval/<name>.jsonl`` and ``<run>/eval/<name>.scores.json``
    (the run's own folder; a later evaluation of the same name replaces them). Otherwise nothing
    is written and the scores are only printed.

    Returns:
        ``(records file or None, scores file or None)``.

    Raises:
        UserError: see :func:`core.outputs.guard_file` / :func:`core.outputs.guard_folder`.
    """
    from core.outputs import guard_file, guard_folder

    if out is not None:
        return guard_file(out, "--out", inputs, overwrite), None
    run = run_of_model(model_dir)
    if run is None:
        return None, None
    folder = guard_folder(run / "eval", "the run's eval folder", "evaluate", inputs)
    return folder / f"{name}.jsonl", folder / f"{name}.scores.json"


def write_evaluation(
    records_path: Path | None, scores_path: Path | None, rows: Sequence[dict], scores: dict
) -> None:
    """Write what :func:`evaluation_outputs` chose, and print the scores as one JSON line."""
    import json

    from core.outputs import mark_folder, write_jsonl, write_text

    if scores_path is not None:
        mark_folder(scores_path.parent, "evaluate")
        write_text(scores_path, json.dumps(scores, indent=1, ensure_ascii=False) + "\n")
    if records_path is not None:
        write_jsonl(records_path, rows)
        print(f"wrote {len(rows)} records to {records_path}", file=sys.stderr)
    print(json.dumps(scores, ensure_ascii=False))
