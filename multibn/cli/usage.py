"""What every command refuses before doing any work: a bad selection or argument (:class:`UsageError`: exit
status 2 and one ``multibn COMMAND: error: ...`` line) and an output path that cannot be written."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..backends import ADAPTERS

#: every backend multibn has, in the order the commands list them
BACKENDS = tuple(ADAPTERS)


class UsageError(ValueError):
    """A bad argument, selection or map: exit status 2, nothing run."""


def usage_error(command: str, error: Exception | str) -> int:
    """Print ``multibn COMMAND: error: ...`` on stderr; the exit status 2."""
    print(f"multibn {command}: error: {error}", file=sys.stderr)
    return 2


def parse_list(value: str | None, allowed: Sequence[str], what: str) -> list[str]:
    """The comma-separated ``value`` as a list (duplicates dropped), every item one of ``allowed``; all of them for
    None. :class:`UsageError` for an unknown item or a value that selects nothing."""
    if value is None:
        return list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise UsageError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    if not items:
        raise UsageError(f"--{what}s {value!r} selects no {what}; choose from {', '.join(allowed)} "
                         f"(or leave the flag out for all)")
    return list(dict.fromkeys(items))


def unavailable(asked: Sequence[str]) -> dict[str, str]:
    """Backend -> why it cannot be imported here, for the asked-for backends that cannot (imports them)."""
    from ..backends import get_backend

    out = {}
    for b in asked:
        try:
            get_backend(b)
        except ImportError as e:
            out[b] = str(e)
    return out


def output_problem(path: str) -> str | None:
    """Why a file cannot be written at ``path`` (a missing or read-only directory, a directory), or None."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.access(directory, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{path} is not writable"
    return None


def check_outputs(command: str, **paths: str | None) -> int | None:
    """Exit status 2 and a one-line error if an output flag (``json=PATH``, ``plot=PATH``) cannot be written;
    None when every given path can. Called before any work, so that a long run does not end in a traceback."""
    for flag, path in paths.items():
        if path is not None and (why := output_problem(path)) is not None:
            return usage_error(command, f"--{flag} {path}: {why}")
    return None
