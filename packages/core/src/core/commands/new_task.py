"""``new-task NAME [--kind KIND] [--dry-run]``: a new task package in this workspace, ready to
train offline.

It writes ``packages/NAME/`` from the template of ``--kind`` (``core/templates/<kind>/``: a
package with the same files and roles as the shipped tasks, its tiny preset and example data),
adds the package to the workspace's ``pyproject.toml`` (dependencies, ``[tool.uv.sources]``, the
test paths, ruff's first-party names) and updates ``uv.lock`` with ``uv lock``. Right after it,
``uv run --package NAME train -c tiny`` trains.

Nothing is written when the name is taken, is not a valid Python package name, or would shadow a
module the workspace imports (``torch``, ``core``, ``datasets``...), or when the command does not
run at the workspace root (exit 2). If ``uv lock`` fails, the package folder is removed and the
root ``pyproject.toml`` is put back as it was (exit 1).

Template files ending in ``.tmpl`` are rendered (``{{name}}``, ``{{Name}}``, ...); the others
(example data) are copied as they are; a path segment ``_name_`` becomes the package name.

Self-check: ``python -m core.commands.new_task`` (renders every kind into a temporary folder).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import keyword
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError, user_errors_exit_2

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


@dataclass(frozen=True)
class Kind:
    """One ``--kind``: its template folder and what it says of itself.

    Attributes:
        summary: what the generated package does, lower case (package descriptions, READMEs).
        dependencies: requirements of the generated package besides ``core``.
    """

    summary: str
    dependencies: tuple[str, ...]


KINDS = {
    "classification": Kind(
        "text classification (AutoModelForSequenceClassification)",
        ("transformers>=4.46", "tokenizers>=0.19"),
    ),
    "seq2seq": Kind(
        "seq2seq generation (AutoModelForSeq2SeqLM)",
        ("transformers>=4.46", "tokenizers>=0.19"),
    ),
    "causal-lm": Kind(
        "a causal LM with a LoRA adapter (peft)",
        ("transformers>=4.46", "tokenizers>=0.19", "peft>=0.13"),
    ),
    "vision-language": Kind(
        "visual question answering (AutoModelForImageTextToText)",
        # Qwen2VLImageProcessor is torchvision-based in transformers 5
        ("transformers>=5.20,<6", "tokenizers>=0.19", "pillow>=10", "torchvision>=0.17"),
    ),
}
"""The kinds ``--kind`` accepts (each a folder under ``core/templates``)."""

NAME = re.compile(r"[a-z][a-z0-9_]*")


def camel(name: str) -> str:
    """``my_task`` -> ``MyTask`` (the config and task class prefix)."""
    return "".join(part.capitalize() for part in name.split("_"))


def find_root(cwd: Path) -> Path:
    """The workspace root, which must be ``cwd``.

    Raises:
        UserError: ``cwd`` is not a uv workspace of this toolkit (names the root when ``cwd`` is
            inside one).
    """
    for folder in [cwd, *cwd.parents]:
        if (
            folder / "packages" / "core" / "pyproject.toml"
        ).is_file() and "[tool.uv.workspace]" in (
            (folder / "pyproject.toml").read_text(encoding="utf-8")
            if (folder / "pyproject.toml").is_file()
            else ""
        ):
            if folder == cwd:
                return folder
            raise UserError(
                f"new-task writes packages/NAME at the workspace root; run it from {folder} "
                f"(this folder is {cwd})."
            )
    raise UserError(
        f"{cwd} is not the root of a workspace of this toolkit (a pyproject.toml with "
        "[tool.uv.workspace] and packages/core). Run new-task from the workspace root."
    )


def check_name(name: str, root: Path) -> None:
    """Refuse a name that cannot be a new package here.

    Raises:
        UserError: not a lower-case Python identifier (and distribution name), a keyword, an
            existing ``packages/NAME``, a workspace member, or a module or distribution the
            workspace can import.
    """
    if not NAME.fullmatch(name) or keyword.iskeyword(name):
        raise UserError(
            f"'{name}' cannot name a task package: use lower-case letters, digits and '_', "
            "starting with a letter (it is the Python package, the distribution and the task "
            "name), e.g. 'intent_classifier'."
        )
    if (root / "packages" / name).exists():
        raise UserError(
            f"packages/{name} exists already; choose another name (nothing was written)."
        )
    normalised = name.replace("_", "-")
    installed = {
        (d.metadata["Name"] or "").lower().replace("_", "-")
        for d in importlib.metadata.distributions()
    }
    if name in sys.stdlib_module_names or importlib.util.find_spec(name) or normalised in installed:
        raise UserError(
            f"'{name}' is a module or distribution the workspace already has (import {name} "
            "would find it); a package of that name would shadow it. Choose another name."
        )


def render(text: str, values: dict[str, str]) -> str:
    """``text`` with every ``{{key}}`` replaced by ``values[key]``.

    Raises:
        KeyError: a placeholder without a value (a broken template).
    """
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)


def template_values(name: str, kind: str) -> dict[str, str]:
    """The placeholders of a template: names, the kind, the requirements."""
    major, minor = (int(x) for x in importlib.metadata.version("core").split(".")[:2])
    summary = KINDS[kind].summary
    return {
        "name": name,
        "Name": camel(name),
        "kind": kind,
        "summary": summary,
        "Summary": summary[0].upper() + summary[1:],
        "core_requirement": f"core>={major}.{minor},<{major}.{minor + 1}",
        "dependencies": "".join(f'    "{d}",\n' for d in KINDS[kind].dependencies),
    }


def package_files(name: str, kind: str) -> dict[Path, bytes]:
    """Every file of the new package: its path relative to ``packages/NAME`` -> its bytes."""
    folder = TEMPLATES / kind
    values = template_values(name, kind)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if "__pycache__" in path.parts:
            continue
        relative = Path(
            *(name if part == "_name_" else part for part in path.relative_to(folder).parts)
        )
        if path.suffix == ".tmpl":
            relative = relative.with_suffix("")
            relative = relative.with_name(relative.name.replace("_name_", name))
            files[relative] = render(path.read_text(encoding="utf-8"), values).encode()
        else:
            files[relative] = path.read_bytes()
    return files


def add_to_workspace(text: str, name: str) -> str:
    """The root ``pyproject.toml`` text with ``name`` added as a dependency, a workspace source,
    a test path and a first-party module (each list edited in place, nothing else touched).

    Raises:
        UserError: a list this command edits is not where it expects it (the file was changed by
            hand): says which, and what to add by hand instead.
    """
    edits = [
        (r"(?m)^(dependencies = \[)(.*?)(\])", f', "{name}"'),
        (r"(?m)^(testpaths = \[)(.*?)(\])", f', "packages/{name}/tests"'),
        (r"(?m)^(known-first-party = \[)(.*?)(\])", f', "{name}"'),
    ]
    for pattern, addition in edits:
        text, count = re.subn(
            pattern, lambda m, a=addition: m.group(1) + m.group(2) + a + m.group(3), text, count=1
        )
        if count != 1:
            raise UserError(
                f"The workspace's pyproject.toml has no one-line '{pattern[6:].split('(')[1]}' "
                f"list to add {name} to; add it by hand, with [tool.uv.sources] {name} = "
                "{ workspace = true }."
            )
    text, count = re.subn(
        r"(?m)^(\[tool\.uv\.sources\]\n(?:.+\n)*)",
        lambda m: m.group(1) + f"{name} = {{ workspace = true }}\n",
        text,
        count=1,
    )
    if count != 1:
        raise UserError("The workspace's pyproject.toml has no [tool.uv.sources] table.")
    parsed = tomllib.loads(text)
    assert name in parsed["project"]["dependencies"], "the dependency was not added"
    assert name in parsed["tool"]["uv"]["sources"], "the source was not added"
    return text


def uv_executable() -> str:
    """The uv that runs this command (``uv run`` sets ``UV``), else the one on PATH.

    Raises:
        UserError: no uv.
    """
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        raise UserError("new-task needs uv to update uv.lock; install it (pip install uv).")
    return found


def write_package(root: Path, name: str, files: dict[Path, bytes]) -> Path:
    """Write ``files`` to ``packages/NAME`` through a hidden sibling folder renamed at the end (an
    interrupted write leaves no half package). Returns the package folder."""
    target = root / "packages" / name
    partial = root / "packages" / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for relative, content in files.items():
        path = partial / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        if path.suffix == ".sbatch":
            path.chmod(0o755)
    partial.rename(target)
    return target


def tidy(package: Path) -> None:
    """Sort the new package's imports and format it with the workspace's ruff, when this
    environment has ruff (the workspace's dev group does): where the package's own imports stand
    among the first-party ones, and how long its lines are, depend on its name."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        return
    for args in (["check", "--fix", "--select", "I", "--quiet"], ["format", "--quiet"]):
        subprocess.run([ruff, *args, str(package)], capture_output=True, cwd=package.parent)


def create(root: Path, name: str, kind: str) -> Path:
    """Write the package, add it to the workspace, update ``uv.lock``; undo both on failure.

    Raises:
        RuntimeError: ``uv lock`` failed (the package and the pyproject change are undone).
    """
    pyproject = root / "pyproject.toml"
    before = pyproject.read_text(encoding="utf-8")
    after = add_to_workspace(before, name)
    target = write_package(root, name, package_files(name, kind))
    lock_before = (root / "uv.lock").read_bytes() if (root / "uv.lock").is_file() else None
    try:
        pyproject.write_text(after, encoding="utf-8")
        done = subprocess.run(
            [uv_executable(), "lock", "--directory", str(root)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"uv lock failed:\n{done.stderr.strip()}")
        tidy(target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        pyproject.write_text(before, encoding="utf-8")
        if lock_before is not None:
            (root / "uv.lock").write_bytes(lock_before)
        raise
    return target


def parser() -> argparse.ArgumentParser:
    """``new-task``'s flags."""
    p = argparse.ArgumentParser(
        prog="new-task",
        description="Write a new task package (packages/NAME) into this workspace, from a "
        "template that trains offline right away: uv run --package NAME train -c tiny.",
    )
    p.add_argument("name", help="package, distribution and task name (e.g. intent_classifier)")
    p.add_argument("--kind", choices=sorted(KINDS), default="classification", help="the template")
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be written; write nothing"
    )
    return p


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    """The ``new-task`` console script.

    Returns:
        0; 2 for a name or place that cannot work (nothing written); 1 when ``uv lock`` failed
        (everything undone).
    """
    args = parser().parse_args(argv)
    root = find_root(Path.cwd().resolve())
    check_name(args.name, root)
    files = package_files(args.name, args.kind)
    if args.dry_run:
        for relative in files:
            print(f"packages/{args.name}/{relative}")
        print(f"pyproject.toml  (adds {args.name} to the workspace)")
        print("uv.lock         (uv lock)")
        return 0
    try:
        target = create(root, args.name, args.kind)
    except RuntimeError as err:
        print(
            f"new-task: {err}\nNothing was kept: packages/{args.name} removed, pyproject.toml "
            "and uv.lock restored.",
            file=sys.stderr,
        )
        return 1
    lines = sum(
        content.count(b"\n")
        for relative, content in files.items()
        if relative.parts[0] == "src" and relative.suffix == ".py"
    )
    print(
        f"wrote {target.relative_to(root)} ({len(files)} files, {lines} lines of Python in src) "
        f"and added it to the workspace.\nNext:\n"
        f"  uv run --package {args.name} train -c tiny\n"
        f"  uv run --package {args.name} pytest packages/{args.name}/tests\n"
        f"Then change data.py, model.py and task.py (see docs/architecture.md)."
    )
    return 0


if __name__ == "__main__":  # self-check: python -m core.commands.new_task
    import tempfile

    for kind in KINDS:
        files = package_files("demo_task", kind)
        assert Path("src/demo_task/task.py") in files, sorted(files)
        assert not any(b"{{" in c and p.suffix != ".jsonl" for p, c in files.items()), kind
    sample = "\n".join(
        [
            '[project]\nname = "w"\ndependencies = ["core"]\n',
            "[tool.uv.sources]\ncore = { workspace = true }\n",
            '[tool.pytest.ini_options]\ntestpaths = ["packages/core/tests"]\n',
            '[tool.ruff.lint.isort]\nknown-first-party = ["core"]\n',
        ]
    )
    edited = tomllib.loads(add_to_workspace(sample, "demo_task"))
    assert edited["project"]["dependencies"] == ["core", "demo_task"], edited
    assert edited["tool"]["uv"]["sources"]["demo_task"] == {"workspace": True}
    with tempfile.TemporaryDirectory() as tmp:
        for bad in ("Demo", "1task", "class", "torch", "core", "json"):
            try:
                check_name(bad, Path(tmp))
                raise AssertionError(f"{bad} was accepted")
            except UserError:
                pass
    print("core.commands.new_task: ok")
