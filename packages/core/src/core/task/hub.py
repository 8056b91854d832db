"""Loading models by Hub id or local folder, with one clear message when neither works.

``transformers`` retries an unreachable Hub for about 30 s and then raises a generic
``OSError``. :func:`ensure_available` answers in a second instead: a local folder must exist; a
Hub id must be in the local cache, or the Hub must answer a quick probe. Otherwise it raises a
:class:`~core.errors.UserError` that says how to proceed.

Self-check: ``python -m core.task.hub``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from core.errors import UserError


def looks_like_path(name: str) -> bool:
    """True for ``./x``, ``/x``, ``~/x``, ``C:\\x``, ``x\\y`` or anything that exists on disk."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or (len(name) > 1 and name[1] == ":")
        or Path(name).exists()
        or name.count("/") > 1
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint accepts a TCP connection within ``timeout`` seconds."""
    if (
        os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    ):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def is_cached(repo_id: str, filename: str = "config.json", repo_type: str = "model") -> bool:
    """Whether ``filename`` of Hub repo ``repo_id`` (a ``model`` or ``dataset`` repo) is in the
    local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    return isinstance(found, str)


def ensure_available(
    name_or_path: str | Path,
    *,
    what: str = "model",
    key: str = "model.name",
    offline_preset: str = "tiny",
    filename: str = "config.json",
    repo_type: str = "model",
) -> None:
    """Check that ``from_pretrained(name_or_path)`` can work here, fast.

    Args:
        name_or_path: a Hub id (``facebook/bart-large-cnn``) or a local folder.
        what: what is being loaded, for the message (``model``, ``tokenizer``, ``processor``).
        key: the config key that names it, for the message.
        offline_preset: the package's preset that needs no download.
        filename: a file every such repo has (to probe the cache; ``README.md`` for datasets).
        repo_type: ``model`` or ``dataset``.

    Raises:
        UserError: a local folder that does not exist, or a Hub id that is neither cached nor
            downloadable now.
    """
    name = str(name_or_path)
    if looks_like_path(name):
        if not Path(name).expanduser().is_dir():
            raise UserError(
                f"{what.capitalize()} folder '{name}' ({key}) does not exist; give a folder "
                "written by save_pretrained or a Hub id."
            )
        return
    if is_cached(name, filename, repo_type) or hub_reachable():
        return
    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    raise UserError(
        f"Cannot load the {what} '{name}' ({key}): the Hugging Face Hub is not reachable from "
        "this machine and "
        f"the files are not in the local cache (HF_HOME={home}). To proceed: download it where "
        "there is network "
        f"(huggingface-cli download {name}) and copy the cache here, or set "
        f"{key}=/path/to/a/local/folder "
        f"written by save_pretrained, or use the offline preset: -c {offline_preset}."
    )


if __name__ == "__main__":  # self-check: python -m core.task.hub
    import time

    start = time.time()
    print("hub reachable:", hub_reachable())
    try:
        ensure_available("facebook/bart-large-cnn")
        print("facebook/bart-large-cnn is available")
    except UserError as err:
        print(f"({time.time() - start:.1f} s) {err}")
    try:
        ensure_available("./no/such/folder")
    except UserError as err:
        print(err)
    print("core.task.hub: ok")
