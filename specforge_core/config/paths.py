"""Where a relative path in a config points: next to the file that wrote it.

A field declared with ``option(..., path=True)`` (core or plugin) is a path. The loader turns every
relative value of such a field into an absolute one:

- set in a config file (or a file it ``extends``): against that file's directory, the same rule as
  ``extends`` itself, so a config means the same thing from any working directory;
- set on the command line (``key=value``), through the Python API (``data=``), or left at its
  built-in default: against the working directory at load time.

Kept as written: empty values, absolute paths, URLs (``scheme://``), values starting with a
``{placeholder}`` (e.g. ``{output_dir}/traces``, resolved by whoever fills the placeholder) or
``$``; ``~`` is expanded. Two kinds need a guess, made the way their consumers read them:
``path-or-hub-id`` (``model.target``) keeps a hub id such as ``Qwen/Qwen3-8B`` unless a local path of
that name exists (or it starts with ``./``/``../``); ``path-or-command`` keeps a bare name with no
``/`` (``python3``, looked up in ``$PATH``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from specforge_core.config.fields import PATH_OR_COMMAND, PATH_OR_HUB

# Sources that are not files (see loader.py): their relative paths mean the working directory.
NOT_FILES = frozenset({"command line", "defaults", "python", ""})
# 'name' or 'org/name' with no other separators: what a model hub id looks like.
_HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")


def base_dir(source: str) -> Path:
    """The directory a relative path set by ``source`` (a file, or a non-file source) is relative to."""
    if source in NOT_FILES:
        return Path.cwd()
    return Path(os.path.abspath(source)).parent


def _kept(value: str) -> bool:
    return not value or os.path.isabs(value) or "://" in value or value.startswith(("{", "$"))


def resolve_one(value: str, kind: str, base: Path) -> str:
    """``value`` of a field of path ``kind`` made absolute against ``base`` (or kept; see module doc)."""
    if value.startswith("~"):
        return os.path.expanduser(value)
    if _kept(value):
        return value
    explicit = value.startswith(("./", "../")) or value in (".", "..")
    if kind == PATH_OR_COMMAND and "/" not in value:
        return value
    joined = os.path.normpath(os.path.join(base, value))
    if kind == PATH_OR_HUB and not explicit and _HUB_ID.match(value) and not os.path.exists(joined):
        return value  # a hub id: transformers/vLLM download it by name
    return joined


def resolve_value(value: Any, kind: str, source: str) -> Any:
    """A raw config value (a string, a list of strings, or anything else: returned unchanged for the
    type check to report) with its paths resolved for ``source``."""
    base = base_dir(source)
    if isinstance(value, str):
        return resolve_one(value, kind, base)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [resolve_one(v, kind, base) for v in value]
    return value
