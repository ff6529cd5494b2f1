"""Where a checkpoint entry that is not part of a BN layer goes between Flax's layouts and torch's/MXNet's."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import CheckpointError, to_numpy
from .names import FLAX_FAMILY, entry_parts, from_canonical, join_entry, to_canonical


def _kernel_perm(ndim: int) -> tuple[int, ...]:
    """torch/MXNet ``(out, in, *spatial)`` -> Flax ``(*spatial, in, out)``: OIHW -> HWIO, (out, in) -> (in, out)."""
    return (*range(2, ndim), 1, 0)


def relayout(src_fmt: str, dst_fmt: str, key: str, value: Any, *, module: str | None = None,
             gluon_style: str = "structural") -> tuple[str, Any, bool] | str:
    """Where a non-BN entry goes when a checkpoint moves between the torch/gluon and the Flax family (flax,
    nnx), or between flax and nnx, as ``(key, value, transposed)``, or the reason it has no place there.

    torch/gluon -> flax/nnx: ``M.weight`` of rank >= 2 is a kernel, ``[params/]M'/kernel``, transposed from
    ``(out, in, *spatial)`` to ``(*spatial, in, out)`` (conv OIHW -> HWIO, dense (out, in) -> (in, out)); a
    rank-1 ``weight`` (or a gluon ``gamma``) is a norm layer's ``scale``; ``bias``/``beta`` is ``bias``. M' is the
    module by the default renaming rule, or ``module`` (the map's name for it). Anything else (buffers, ``aux:``
    states, 0-d values) has no place in a Flax model. flax/nnx -> torch/gluon is the inverse, for flax's
    ``params`` collection and nnx's parameters; an ``embedding`` is carried as ``weight`` unchanged. Between
    flax and nnx only the names change. Neither side records what kind of layer owns an entry, so a rank-2
    torch ``weight`` is taken for a ``Linear`` (an ``nn.Embedding``'s table would be transposed wrongly; name
    it with an entry of the map, which is carried as it is).
    """
    ns, mod, leaf = entry_parts(src_fmt, key)
    if not hasattr(value, "shape"):
        return f"a {type(value).__name__}, not an array"
    ndim = len(value.shape)
    src_flax, dst_flax = src_fmt in FLAX_FAMILY, dst_fmt in FLAX_FAMILY
    if src_fmt == "flax" and (ns != "params" or not leaf):
        return f"Flax collection {ns!r}: only 'params' and 'batch_stats' have a {dst_fmt} counterpart"
    perm: tuple[int, ...] | None = None
    if src_flax and dst_flax:
        new_leaf = leaf
    elif dst_flax:
        if ns == "aux:":
            return "an auxiliary state of a non-BN layer: a Flax model has no place for it"
        if leaf == "weight" and ndim >= 2:
            new_leaf, perm = "kernel", _kernel_perm(ndim)
        elif (leaf == "weight" or (leaf == "gamma" and src_fmt == "gluon")) and ndim == 1:
            new_leaf = "scale"
        elif (leaf == "bias" or (leaf == "beta" and src_fmt == "gluon")) and ndim == 1:
            new_leaf = "bias"
        else:
            return (f"{leaf!r} of shape {tuple(value.shape)} is not a weight or bias: a Flax model has no "
                    "place for it")
    else:
        if leaf == "kernel" and ndim >= 2:
            new_leaf, perm = "weight", tuple(int(i) for i in np.argsort(_kernel_perm(ndim)))
        elif leaf in ("scale", "bias", "embedding"):
            new_leaf = "bias" if leaf == "bias" else "weight"
        else:
            return f"{leaf!r} of shape {tuple(value.shape)} is not a kernel, scale, bias or embedding"
    target = module if module is not None else from_canonical(dst_fmt, to_canonical(src_fmt, mod), gluon_style)
    new_ns = {"flax": "params", "gluon": "arg:" if gluon_style == "symbol" else ""}.get(dst_fmt, "")
    new_key = join_entry(dst_fmt, new_ns, target, new_leaf)
    if perm is None:
        return new_key, value, False
    try:
        a = to_numpy(value)
    except CheckpointError as e:
        return str(e)
    return new_key, np.ascontiguousarray(np.transpose(a, perm)), True
