"""What every checkpoint format shares: the read checkpoint (:class:`Checkpoint` of :class:`BNLayer`), its error,
the grouping of a file's entries into BN layers, values as NumPy arrays, and the atomic write."""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .names import display_name


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or entries that cannot be written in a format."""


@dataclass
class BNLayer:
    """One BN layer of a checkpoint. Arrays are the file's own (torch tensors, NDArrays, NumPy arrays)."""

    name: str
    running_mean: Any
    running_var: Any
    gamma: Any = None
    beta: Any = None
    num_batches_tracked: int | None = None
    #: role ("gamma", "beta", "mean", "var", "count") -> the key in the source file
    keys: dict[str, str] = field(default_factory=dict)
    #: gluon naming of the source entries: {"symbol": bool, "stats": "running"|"moving"}; None elsewhere
    gluon_style: dict[str, Any] | None = None

    @property
    def channels(self) -> int:
        return int(self.running_var.shape[0])


@dataclass
class Checkpoint:
    #: the format the entries were read from (the values are that framework's arrays)
    format: str
    layers: dict[str, BNLayer]
    #: every entry that is not part of a BN layer, by key (flax: path joined with "/"), untouched
    other: dict[str, Any]
    #: ("bn", layer name) and ("other", key) in file order
    order: list[tuple[str, str]]
    #: BN-looking entries that do not form a complete BN layer (their entries are in ``other``)
    problems: list[str] = field(default_factory=list)
    #: torch: the state_dict's ``_metadata``
    metadata: Any = None


class Format(NamedTuple):
    """What one format module provides (:mod:`.torch`, :mod:`.gluon`, :mod:`.flax`)."""

    #: ``read(path, head)``: the checkpoint in the file (``head``: its first bytes)
    read: Callable[[str, bytes], Checkpoint]
    #: ``layer_entries(layer, ckpt, gluon_style, batches)``: ``(key, value)`` of each entry of a BN layer
    layer_entries: Callable[[BNLayer, Checkpoint, str | None, int], list[tuple[str, Any]]]
    #: ``to_file(flat, owner, ckpt)``: the object the format saves for the entries ``flat`` (key -> value);
    #: ``owner`` names what wrote each key, for errors
    to_file: Callable[[dict[str, Any], dict[str, str], Checkpoint], Any]
    #: ``saver(obj)``: a function that writes ``obj`` to a path
    saver: Callable[[Any], Callable[[str], None]]


def first_line(e: BaseException) -> str:
    """The gist of an exception: its first sentence (MXNet's: the last line, after a C++ traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    name = type(e).__name__
    msg = msg.removeprefix(name + ":").strip().split(". ")[0][:200]
    return f"{name}: {msg}" if msg else name


def framework(name: str) -> Any:
    """The framework module ``name`` (``"mxnet"``: through multibn's adapter, which restores ``np.bool`` first);
    CheckpointError when it cannot be imported."""
    try:
        if name == "mxnet":
            return importlib.import_module("multibn.backends.mxnet").mx
        return importlib.import_module(name)
    except ImportError as e:
        raise CheckpointError(
            f"reading or writing this format needs {name}, which cannot be imported here ({e})"
        ) from e


def group_keys(keys: list[str], split: Callable[[str], tuple[str, str] | None]) -> dict[str, dict[str, str]]:
    """Keys grouped by layer: ``split(key)`` gives ``(layer, role)`` for a BN entry, else None."""
    groups: dict[str, dict[str, str]] = {}
    for k in keys:
        hit = split(k)
        if hit is not None:
            groups.setdefault(hit[0], {})[hit[1]] = k
    return groups


def _vector_problem(name: str, arrays: dict[str, Any]) -> str | None:
    shapes = {role: tuple(a.shape) for role, a in arrays.items() if a is not None}
    c = shapes.get("var")
    if c is None or len(c) != 1:
        return f"{display_name(name)}: running variance of shape {c} (expected one value per channel)"
    wrong = {r: s for r, s in shapes.items() if s != c}
    if wrong:
        return f"{display_name(name)}: shapes {wrong} do not match the running variance's {c}"
    return None


def assemble(
    fmt: str, entries: Mapping[str, Any], groups: dict[str, dict[str, str]], order_keys: list[str],
    style: Callable[[dict[str, str]], dict[str, Any] | None] = lambda _: None,
) -> Checkpoint:
    """The checkpoint of a file's ``entries`` whose BN layers are ``groups`` (layer -> role -> key): incomplete or
    malformed groups become ``problems`` (their entries stay in ``other``)."""
    layers: dict[str, BNLayer] = {}
    problems: list[str] = []
    owner: dict[str, str] = {}
    for name, roles in groups.items():
        if "mean" not in roles or "var" not in roles:
            have, missing = ("mean", "variance") if "mean" in roles else ("var", "mean")
            problems.append(
                f"{display_name(name)}: {roles[have]!r} has no matching running {missing} entry, so it is not "
                "a complete BN layer"
            )
            continue
        arrays = {r: entries[roles[r]] if r in roles else None for r in ("mean", "var", "gamma", "beta")}
        bad = [r for r, a in arrays.items() if a is not None and not hasattr(a, "shape")]
        problem = (f"{display_name(name)}: {', '.join(roles[r] for r in bad)} is not an array" if bad
                   else _vector_problem(name, arrays))
        if problem:
            problems.append(problem)
            continue
        count = None
        if "count" in roles:
            try:
                count = int(np.asarray(to_numpy(entries[roles["count"]])).reshape(-1)[0])
            except (TypeError, ValueError, IndexError, CheckpointError):
                problems.append(f"{display_name(name)}: {roles['count']!r} is not an integer counter")
                continue
        layers[name] = BNLayer(name, arrays["mean"], arrays["var"], arrays["gamma"], arrays["beta"], count,
                               dict(roles), style(roles))
        for k in roles.values():
            owner[k] = name
    other: dict[str, Any] = {}
    order: list[tuple[str, str]] = []
    seen: set[str] = set()
    for k in order_keys:
        if k in owner:
            if owner[k] not in seen:
                seen.add(owner[k])
                order.append(("bn", owner[k]))
        else:
            other[k] = entries[k]
            order.append(("other", k))
    return Checkpoint(fmt, layers, other, order, problems)


def to_numpy(v: Any) -> np.ndarray:
    """An array of any format's framework as a NumPy array; CheckpointError for what is not an array."""
    if isinstance(v, (np.ndarray, np.generic)):
        return np.asarray(v)
    mod = type(v).__module__.split(".")[0]
    if mod == "torch":
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            raise CheckpointError("a bfloat16 tensor has no NumPy dtype, so it cannot leave a torch file")
        return v.numpy()
    if mod == "mxnet":
        return v.asnumpy()
    if mod in ("jax", "jaxlib"):
        return np.asarray(v)
    raise CheckpointError(f"a {type(v).__name__} is not an array")


def atomic_write(path: str, save: Callable[[str], None]) -> None:
    """``save(tmp)`` into a temporary file beside ``path``, then ``os.replace(tmp, path)``; no debris on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        save(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it an ordinary new file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
