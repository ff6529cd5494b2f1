"""The gluon format: an MXNet parameter file (``mx.nd.save``/``mx.nd.load``).

Entries ``<prefix>gamma``, ``<prefix>beta``, ``<prefix>running_mean``, ``<prefix>running_var`` as written by
``save_parameters`` (``features.1.gamma``) or ``collect_params().save`` (``batchnorm0_gamma``), and the symbol API's
``arg:<prefix>gamma``, ``arg:<prefix>beta``, ``aux:<prefix>moving_mean``, ``aux:<prefix>moving_var`` (``export()``
writes ``aux:<prefix>running_mean``). Layer names are the prefixes, separator included (``features.1.``,
``batchnorm0_``; ``""`` for a bare block). MXNet is imported only when a file is read or written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .base import BNLayer, Checkpoint, CheckpointError, Format, assemble, first_line, framework, to_numpy
from .names import display_name

_MX_MAGIC = (0x112).to_bytes(8, "little")


def _split(k: str) -> tuple[str, str, str, str] | None:
    """``(namespace, prefix, role, stats word)`` of a gluon BN key, else None."""
    ns = k[:4] if k.startswith(("arg:", "aux:")) else ""
    bare = k[len(ns):]
    for suffix, role in (("running_mean", "mean"), ("running_var", "var"), ("moving_mean", "mean"),
                         ("moving_var", "var"), ("gamma", "gamma"), ("beta", "beta")):
        if bare.endswith(suffix):
            prefix = bare[: -len(suffix)]
            if prefix == "" or prefix.endswith((".", "_")):
                return ns, prefix, role, suffix.split("_")[0] if "_" in suffix else ""
    return None


def read(path: str, head: bytes) -> Checkpoint:
    if not head.startswith(_MX_MAGIC):
        raise CheckpointError(
            f"{path}: not an MXNet parameter file (no NDArray-list header; mx.nd.save files start with 0x112)"
        )
    mx = framework("mxnet")
    try:
        obj = mx.nd.load(path)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read as an MXNet parameter file, corrupt or truncated ({first_line(e)})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds {len(obj)} unnamed arrays (mx.nd.save of a list), not named parameters")
    keys = list(obj)
    stats: dict[str, dict[str, str]] = {}
    for k in keys:
        hit = _split(k)
        if hit and hit[2] in ("mean", "var"):
            stats.setdefault(hit[1], {})
    groups: dict[str, dict[str, str]] = {}
    for k in keys:
        hit = _split(k)
        if hit is None or hit[1] not in stats:
            continue
        _, prefix, role, _ = hit
        if role in groups.get(prefix, {}):
            raise CheckpointError(
                f"{path}: layer {display_name(prefix)} has two {role} entries, {groups[prefix][role]!r} and {k!r}"
            )
        groups.setdefault(prefix, {})[role] = k

    def style(roles: dict[str, str]) -> dict[str, Any]:
        key = roles["mean"]
        return {"symbol": key.startswith("aux:"), "stats": _split(key)[3]}  # type: ignore[index]

    return assemble("gluon", obj, groups, keys, style)


def gluon_keys(name: str, style: dict[str, Any]) -> dict[str, str]:
    """role -> key of a gluon BN layer with prefix ``name`` in ``style`` ({"symbol": bool, "stats": word})."""
    arg, aux = ("arg:", "aux:") if style["symbol"] else ("", "")
    word = style["stats"]
    return {"gamma": f"{arg}{name}gamma", "beta": f"{arg}{name}beta",
            "mean": f"{aux}{name}{word}_mean", "var": f"{aux}{name}{word}_var"}


def _style(layer: BNLayer, style: str | None) -> dict[str, Any]:
    if style is None and layer.gluon_style is not None:
        return layer.gluon_style
    return {"symbol": True, "stats": "moving"} if style == "symbol" else {"symbol": False, "stats": "running"}


def layer_entries(layer: BNLayer, ckpt: Checkpoint, gluon_style: str | None, batches: int) -> list[tuple[str, Any]]:
    """The entries of ``layer`` named in ``gluon_style`` (None: the layer's own where it was read from a gluon
    file); gamma and beta always, ones and zeros where the layer has none (a gluon BatchNorm has both)."""
    keys = gluon_keys(layer.name, _style(layer, gluon_style))
    gamma, beta = layer.gamma, layer.beta
    ref = to_numpy(layer.running_var)
    gamma = np.ones_like(ref) if gamma is None else gamma
    beta = np.zeros_like(ref) if beta is None else beta
    return [(keys["gamma"], gamma), (keys["beta"], beta), (keys["mean"], layer.running_mean),
            (keys["var"], layer.running_var)]


def _to_mx(v: Any, key: str) -> Any:
    mx = framework("mxnet")
    if isinstance(v, mx.nd.NDArray):
        return v
    if not hasattr(v, "shape"):
        raise CheckpointError(
            f"{key!r} is a {type(v).__name__}, not an array: an MXNet parameter file holds only arrays"
        )
    a = to_numpy(v)
    if a.ndim == 0 or a.size == 0:
        raise CheckpointError(
            f"{key!r} has shape {a.shape}: MXNet 1.x parameter files cannot hold 0-d or empty arrays"
        )
    try:
        return mx.nd.array(a, dtype=a.dtype)
    except Exception as e:
        raise CheckpointError(f"{key!r} (dtype {a.dtype}) cannot be stored in an MXNet file: {first_line(e)}") from e


def to_file(flat: dict[str, Any], owner: dict[str, str], ckpt: Checkpoint) -> Any:
    """The dict of NDArrays that ``mx.nd.save`` writes."""
    return {k: _to_mx(v, k) for k, v in flat.items()}


def saver(obj: Any) -> Callable[[str], None]:
    mx = framework("mxnet")
    return lambda tmp: mx.nd.save(tmp, obj)


FORMAT = Format(read, layer_entries, to_file, saver)
