"""The BN entries of PyTorch, MXNet Gluon and Flax checkpoint files, by layer name; every other entry kept as is.

One module per format, each importing its framework only when a file of that format is read or written:
:mod:`.torch` (a ``state_dict`` of ``torch.save``), :mod:`.gluon` (an MXNet parameter file, ``save_parameters``
or the symbol API's ``arg:``/``aux:`` entries), :mod:`.flax` (Flax linen variables, ``flax``, and NNX state as a
pure dict, ``nnx``, both ``flax.serialization`` msgpack). :mod:`.names` has the layer names of each format and
the default rule between formats (within one format names are kept; between formats they go through the
dotted module path); :mod:`.base` the read :class:`Checkpoint` and what the formats share.

Between torch and gluon (the same module paths and layouts) every entry that is not part of a BN layer is
carried unchanged, under its own key: the same values, dtype and shape, bit for bit. Between Flax and
torch/gluon, :func:`relayout` places each such entry where the other framework's model has it (``M.weight``
<-> ``params/M'/kernel`` with the kernel transposed between ``(out, in, *spatial)`` and ``(*spatial, in,
out)``, ``bias`` <-> ``bias``, a rank-1 ``weight`` <-> ``scale``); what has no place there is left out and
listed by the command. Transposes are exact, so a round trip gives the placed entries back bit for bit.
Writes go to a temporary file in the output's directory, renamed over the output only when complete.
"""

from __future__ import annotations

import os
from typing import Any

from . import flax as _flax
from . import gluon as _gluon
from . import torch as _torch
from .base import BNLayer, Checkpoint, CheckpointError, Format, atomic_write
from .gluon import gluon_keys
from .names import (
    DEFAULT_CONVENTION,
    FLAX_FAMILY,
    FORMATS,
    GLUON_STYLES,
    default_target_name,
    display_name,
    entry_parts,
    from_canonical,
    join_entry,
    to_canonical,
)
from .relayout import relayout

__all__ = [
    "DEFAULT_CONVENTION",
    "FLAX_FAMILY",
    "FORMATS",
    "GLUON_STYLES",
    "BNLayer",
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
    "build",
    "default_target_name",
    "display_name",
    "entry_parts",
    "from_canonical",
    "gluon_keys",
    "join_entry",
    "read_checkpoint",
    "relayout",
    "to_canonical",
    "write_checkpoint",
]

_FORMATS: dict[str, Format] = {"torch": _torch.FORMAT, "gluon": _gluon.FORMAT, "flax": _flax.FLAX, "nnx": _flax.NNX}


def _check_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return _FORMATS[fmt]


def read_checkpoint(path: str | os.PathLike[str], fmt: str) -> Checkpoint:
    """The checkpoint at ``path`` of format ``fmt`` (``torch``, ``gluon``, ``flax``); CheckpointError if unreadable."""
    form = _check_format(fmt)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path}: the file is empty")
    return form.read(path, head)


def build(ckpt: Checkpoint, fmt: str, *, gluon_style: str | None = None, batches: int = 0) -> Any:
    """The object that ``fmt`` saves for ``ckpt`` (a state_dict, a dict of NDArrays, a Flax variable tree).

    Its layers are written under their names (already in ``fmt``'s notation); ``ckpt.other`` under their
    keys. ``gluon_style`` ("structural": ``<prefix>gamma``, ``<prefix>running_mean``; "symbol":
    ``arg:<prefix>gamma``, ``aux:<prefix>moving_mean``) names the gluon entries; None keeps each layer's own
    style when it was read from a gluon file, else structural. ``batches`` is torch's
    ``num_batches_tracked`` for layers that have none. CheckpointError for clashing keys or values ``fmt``
    cannot hold.
    """
    if gluon_style is not None and gluon_style not in GLUON_STYLES:
        raise ValueError(f"gluon_style must be one of {', '.join(GLUON_STYLES)}, got {gluon_style!r}")
    form = _check_format(fmt)
    flat: dict[str, Any] = {}
    owner: dict[str, str] = {}

    def put(key: str, value: Any, what: str) -> None:
        if key in flat:
            raise CheckpointError(f"{what} and {owner[key]} would both be written as {key!r}")
        flat[key] = value
        owner[key] = what

    for kind, ref in ckpt.order:
        if kind == "other":
            put(ref, ckpt.other[ref], f"entry {ref!r}")
            continue
        layer = ckpt.layers[ref]
        what = f"BN layer {display_name(layer.name)}"
        for key, value in form.layer_entries(layer, ckpt, gluon_style, batches):
            put(key, value, what)
    return form.to_file(flat, owner, ckpt)


def write_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint, fmt: str, **kwargs: Any) -> None:
    """Save ``ckpt`` as a ``fmt`` file at ``path``, atomically: a failure leaves ``path`` as it was.

    Everything is converted in memory first (:func:`build`, ``kwargs`` go there), then written to a temporary
    file in the same directory and renamed over ``path``.
    """
    form = _check_format(fmt)
    obj = build(ckpt, fmt, **kwargs)
    atomic_write(os.fspath(path), form.saver(obj))
