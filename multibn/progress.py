"""The one progress bar of the library and the commands: ``tqdm``, shown only where someone watches."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


def progress_bar(progress: bool | TextIO | None, total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A ``tqdm`` bar: ``progress`` True shows it on stderr when stderr is a terminal, a text stream shows it there,
    False or None shows nothing (the bar still counts: ``bar.n``). TypeError for anything else."""
    stream: Any
    if progress is True:
        stream = sys.stderr if hasattr(sys.stderr, "isatty") and sys.stderr.isatty() else None
    elif progress is False or progress is None:
        stream = None
    elif hasattr(progress, "write"):
        stream = progress
    else:
        raise TypeError(f"progress must be a bool or a text stream, got {type(progress).__name__}")
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=stream is None, leave=False,
                mininterval=0.1, dynamic_ncols=True)
