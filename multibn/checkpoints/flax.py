"""The Flax formats, msgpack files of ``flax.serialization.to_bytes`` (read with ``msgpack_restore``).

``flax``
    linen variables: a BN layer is a path ``P`` with ``batch_stats/P/mean`` and ``batch_stats/P/var``, and
    optionally ``params/P/scale`` and ``params/P/bias``. Layer names are the paths joined with ``/``
    (``features_1``, ``block/bn``; ``""`` for a bare ``nn.BatchNorm``).
``nnx``
    NNX state as a pure dict, ``to_bytes(nnx.to_pure_dict(nnx.state(model)))`` (load it back with
    ``nnx.replace_by_pure_dict(nnx.state(model), msgpack_restore(data))`` and ``nnx.update``): a BN layer is a
    path ``P`` with ``P/mean`` and ``P/var`` (``nnx.BatchNorm``'s batch statistics), and optionally ``P/scale``
    and ``P/bias``. Layer names are the attribute paths joined with ``/`` (``bn``, ``blocks/0/bn``: a list index
    is a path component).

Flax is imported only when a file is read or written.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .base import BNLayer, Checkpoint, CheckpointError, Format, assemble, first_line, framework, group_keys, to_numpy


def _serialization() -> Any:
    framework("flax")
    return importlib.import_module("flax.serialization")


def _flatten(tree: Any, prefix: tuple[str, ...], out: dict[tuple[str, ...], Any]) -> None:
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            _flatten(v, (*prefix, str(k)), out)
    else:
        out[prefix] = tree


def _entries(path: str, what: str) -> dict[str, Any]:
    """The leaves of a flax.serialization msgpack file, by path joined with ``/``."""
    serialization = _serialization()
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read as {what} (flax.serialization msgpack), corrupt or truncated ({first_line(e)})"
        ) from e
    if not isinstance(tree, dict) or not tree:
        raise CheckpointError(f"{path}: holds a {type(tree).__name__}, not a dict of {what}")
    leaves: dict[tuple[str, ...], Any] = {}
    _flatten(tree, (), leaves)
    return {"/".join(p): v for p, v in leaves.items()}


def read_nnx(path: str, head: bytes) -> Checkpoint:
    entries = _entries(path, "Flax NNX state")

    def split(key: str) -> tuple[str, str] | None:
        layer, _, leaf = key.rpartition("/")
        return (layer, leaf) if leaf in ("mean", "var") else None

    groups = group_keys(list(entries), split)
    for name, roles in groups.items():
        for leaf, role in (("scale", "gamma"), ("bias", "beta")):
            k = "/".join(filter(None, (name, leaf)))
            if k in entries:
                roles[role] = k
    return assemble("nnx", entries, groups, list(entries))


def read_flax(path: str, head: bytes) -> Checkpoint:
    entries = _entries(path, "Flax variable collections")
    stats_roles = {"mean": "mean", "var": "var"}
    param_roles = {"scale": "gamma", "bias": "beta"}

    def split(key: str) -> tuple[str, str] | None:
        coll, _, rest = key.partition("/")
        if coll == "batch_stats" and rest:
            layer, _, leaf = rest.rpartition("/")
            if leaf in stats_roles:
                return layer, stats_roles[leaf]
        return None

    groups = group_keys(list(entries), split)
    for name, roles in groups.items():
        for leaf, role in param_roles.items():
            k = "/".join(filter(None, ("params", name, leaf)))
            if k in entries:
                roles[role] = k
    return assemble("flax", entries, groups, list(entries))


def _layer_entries(layer: BNLayer, params: str, stats: str) -> list[tuple[str, Any]]:
    pre = layer.name + "/" if layer.name else ""
    return [(key, value) for key, value in ((f"{params}{pre}scale", layer.gamma), (f"{params}{pre}bias", layer.beta),
                                            (f"{stats}{pre}mean", layer.running_mean),
                                            (f"{stats}{pre}var", layer.running_var)) if value is not None]


def flax_layer_entries(layer: BNLayer, ckpt: Checkpoint, gluon_style: str | None, batches: int
                       ) -> list[tuple[str, Any]]:
    """``params/P/scale``, ``params/P/bias``, ``batch_stats/P/mean``, ``batch_stats/P/var`` (those it has)."""
    return _layer_entries(layer, "params/", "batch_stats/")


def nnx_layer_entries(layer: BNLayer, ckpt: Checkpoint, gluon_style: str | None, batches: int
                      ) -> list[tuple[str, Any]]:
    """``P/scale``, ``P/bias``, ``P/mean``, ``P/var`` (those it has)."""
    return _layer_entries(layer, "", "")


def _to_flax(v: Any, key: str) -> Any:
    if not hasattr(v, "shape"):
        return v
    try:
        return to_numpy(v)
    except CheckpointError as e:
        raise CheckpointError(f"{key!r} cannot be stored in a Flax file: {e}") from e


def to_file(flat: dict[str, Any], owner: dict[str, str], ckpt: Checkpoint) -> Any:
    """The nested dict of the entries ``flat`` (keys are paths joined with ``/``), NumPy arrays at the leaves."""
    tree: dict[str, Any] = {}
    for k, v in flat.items():
        node = tree
        *parents, leaf = k.split("/")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CheckpointError(
                    f"{owner[k]} needs {'/'.join(parents[: i + 1])!r} to be a subtree, but it is a value"
                )
        if leaf in node:
            raise CheckpointError(f"{owner[k]} would overwrite the subtree {k!r}")
        node[leaf] = _to_flax(v, k)
    return tree


def saver(obj: Any) -> Callable[[str], None]:
    data = _serialization().msgpack_serialize(obj)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return save


FLAX = Format(read_flax, flax_layer_entries, to_file, saver)
NNX = Format(read_nnx, nnx_layer_entries, to_file, saver)
