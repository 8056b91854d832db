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
        + f"  {prog} -c {default_preset or (presets[0] if presets else 'FILE.yaml')} trainer.max_steps=100 optim.lr=1e-4\n"
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
) -> tuple[Any, argparse.Namespace]:
    """Parse ``train`` arguments into a validated config.

    Returns:
        ``(config, namespace)``; the namespace says whether to only print the config.

    Raises:
        UserError: unknown preset / key, wrong value.
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
            f"'{bad[0]}' is not an override of the form key=value (e.g. trainer.max_steps=100); presets go after -c."
        )
    cfg = load_config(config_cls, args.config or default_preset, args.overrides, presets_dir)
    return cfg, args


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
    return 0
