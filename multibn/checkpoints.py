"""The BN entries of PyTorch, MXNet Gluon and Flax checkpoint files, by layer name; every other entry kept as is.

Formats (each framework is imported only when its format is read or written):

``torch``
    a ``state_dict`` saved with ``torch.save`` (read with ``torch.load(weights_only=True)``): a BN layer is a
    module name ``L`` with ``L.running_mean`` and ``L.running_var``, and optionally ``L.weight``, ``L.bias`` and
    ``L.num_batches_tracked``. Layer names are module names (``features.1``; ``""`` for a bare BN module).
``gluon``
    an MXNet parameter file (``mx.nd.save``/``mx.nd.load``): ``<prefix>gamma``, ``<prefix>beta``,
    ``<prefix>running_mean``, ``<prefix>running_var`` as written by ``save_parameters`` (``features.1.gamma``)
    or ``collect_params().save`` (``batchnorm0_gamma``), and the symbol API's ``arg:<prefix>gamma``,
    ``arg:<prefix>beta``, ``aux:<prefix>moving_mean``, ``aux:<prefix>moving_var`` (``export()`` writes
    ``aux:<prefix>running_mean``). Layer names are the prefixes, separator included (``features.1.``,
    ``batchnorm0_``; ``""`` for a bare block).
``flax``
    Flax linen variables serialised with ``flax.serialization.to_bytes`` (read with ``msgpack_restore``): a
    BN layer is a path ``P`` with ``batch_stats/P/mean`` and ``batch_stats/P/var``, and optionally
    ``params/P/scale`` and ``params/P/bias``. Layer names are the paths joined with ``/`` (``features_1``,
    ``block/bn``; ``""`` for a bare ``nn.BatchNorm``).
``nnx``
    Flax NNX state as a pure dict, ``flax.serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))``
    (load it back with ``nnx.replace_by_pure_dict(nnx.state(model), msgpack_restore(data))`` and
    ``nnx.update``): a BN layer is a path ``P`` with ``P/mean`` and ``P/var`` (``nnx.BatchNorm``'s batch
    statistics), and optionally ``P/scale`` and ``P/bias``. Layer names are the attribute paths joined with
    ``/`` (``bn``, ``blocks/0/bn``: a list index is a path component).

Default layer-name rule between formats (:func:`default_target_name`); within one format names are kept:

* torch and gluon ``save_parameters`` names are the same dotted module path: ``features.1`` <-> ``features.1.``;
  a gluon prefix ending in ``_`` (``batchnorm0_``, symbol API ``bn0_``) reads as ``batchnorm0``; towards a
  symbol-style gluon file dots become underscores (``features.1`` -> ``features_1_``);
* towards flax, a dotted name splits into path components and a numeric component (a ``Sequential`` or
  ``ModuleList`` index) joins the one before it with ``_``, Flax's naming of list attributes:
  ``features.1`` -> ``features_1``, ``layer1.0.bn1`` -> ``layer1_0/bn1``; from flax, a component ending in
  ``_<digits>`` splits back: ``BatchNorm_0`` -> ``BatchNorm.0``, ``layer1_0/bn1`` -> ``layer1.0.bn1``.
  (So a torch module whose own name ends in ``_<digits>``, ``conv_1``, comes back from flax as ``conv.1``:
  name such layers with a map.)

Between torch and gluon (the same module paths and layouts) every entry that is not part of a BN layer is
carried unchanged, under its own key: the same values, dtype and shape, bit for bit. Between Flax and
torch/gluon, :func:`relayout` places each such entry where the other framework's model has it (``M.weight``
<-> ``params/M'/kernel`` with the kernel transposed between ``(out, in, *spatial)`` and ``(*spatial, in,
out)``, ``bias`` <-> ``bias``, a rank-1 ``weight`` <-> ``scale``); what has no place there is left out and
listed by the command. Transposes are exact, so a round trip gives the placed entries back bit for bit.
Writes go to a temporary file in the output's directory, renamed over the output only when complete.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMATS = ("torch", "gluon", "flax", "nnx")
#: the formats whose weights have Flax's layouts (HWIO kernels, ``(in, out)`` dense kernels)
FLAX_FAMILY = ("flax", "nnx")
#: the convention of each format's native BN layer, the default for a file of that format
DEFAULT_CONVENTION = {"torch": "torch", "gluon": "gluon", "flax": "flax", "nnx": "flax"}
GLUON_STYLES = ("structural", "symbol")
_TORCH_MAGIC_ZIP = b"PK\x03\x04"
_MX_MAGIC = (0x112).to_bytes(8, "little")


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


# ---- names ------------------------------------------------------------------------------------------------------
_FLAX_INDEX = re.compile(r"(.+?)((?:_\d+)+)")


def to_canonical(fmt: str, name: str) -> str:
    """A layer name of ``fmt`` as a dotted module path (torch's notation)."""
    if fmt == "torch":
        return name
    if fmt == "nnx":
        return name.replace("/", ".")
    if fmt == "gluon":
        return name[:-1] if name.endswith((".", "_")) else name
    if fmt == "flax":
        parts = []
        for comp in name.split("/") if name else []:
            m = _FLAX_INDEX.fullmatch(comp)
            parts.append(m.group(1) + m.group(2).replace("_", ".") if m else comp)
        return ".".join(parts)
    raise ValueError(f"unknown format {fmt!r}")


def from_canonical(fmt: str, name: str, gluon_style: str = "structural") -> str:
    """A dotted module path as a layer name of ``fmt``."""
    if fmt == "torch":
        return name
    if fmt == "nnx":
        return name.replace(".", "/")
    if fmt == "gluon":
        if not name:
            return ""
        return name + "." if gluon_style == "structural" else name.replace(".", "_") + "_"
    if fmt == "flax":
        comps: list[str] = []
        for part in name.split(".") if name else []:
            if part.isdigit() and comps:
                comps[-1] += "_" + part
            else:
                comps.append(part)
        return "/".join(comps)
    raise ValueError(f"unknown format {fmt!r}")


def default_target_name(src_fmt: str, dst_fmt: str, name: str, gluon_style: str = "structural") -> str:
    """The default rule (module docstring): the same name within a format, else through the dotted path."""
    if src_fmt == dst_fmt:
        return name
    return from_canonical(dst_fmt, to_canonical(src_fmt, name), gluon_style)


def display_name(name: str) -> str:
    return name if name else "(root)"


# ---- reading ----------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike[str], fmt: str) -> Checkpoint:
    """The checkpoint at ``path`` of format ``fmt`` (``torch``, ``gluon``, ``flax``); CheckpointError if unreadable."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path}: the file is empty")
    return {"torch": _read_torch, "gluon": _read_gluon, "flax": _read_flax, "nnx": _read_nnx}[fmt](path, head)


def _first_line(e: BaseException) -> str:
    """The gist of an exception: its first sentence (MXNet's: the last line, after a C++ traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines else "")
    name = type(e).__name__
    msg = msg.removeprefix(name + ":").strip().split(". ")[0][:200]
    return f"{name}: {msg}" if msg else name


def _framework(name: str) -> Any:
    try:
        if name == "mxnet":
            return importlib.import_module("multibn.backends.mxnet").mx  # restores np.bool first
        return importlib.import_module(name)
    except ImportError as e:
        raise CheckpointError(
            f"reading or writing this format needs {name}, which cannot be imported here ({e})"
        ) from e


def _group(keys: list[str], split: Callable[[str], tuple[str, str] | None]) -> dict[str, dict[str, str]]:
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


def _assemble(
    fmt: str, entries: Mapping[str, Any], groups: dict[str, dict[str, str]], order_keys: list[str],
    style: Callable[[dict[str, str]], dict[str, Any] | None] = lambda _: None,
) -> Checkpoint:
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
                count = int(np.asarray(_to_numpy(entries[roles["count"]])).reshape(-1)[0])
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


def _read_torch(path: str, head: bytes) -> Checkpoint:
    torch = _framework("torch")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if pickled:
            raise CheckpointError(
                f"{path}: holds a pickled Python object ({pickled.group(1)}), not a state_dict: torch.save(model) "
                "pickles the module itself, which multibn does not unpickle (unpickling can run arbitrary code). "
                "Where the model's class is defined, save its parameters instead: "
                "torch.save(model.state_dict(), PATH)"
            ) from e
        what = ("a torch.save zip archive that is corrupt or truncated" if head.startswith(_TORCH_MAGIC_ZIP)
                else "not a torch.save file (neither a zip archive nor a legacy torch pickle), or a corrupt one")
        raise CheckpointError(f"{path}: cannot read as a torch state_dict: {what} ({_first_line(e)})") from e
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)"
        )
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
        hint = f"; save the model's state_dict itself (this file nests mappings under {nested[:3]})" if nested else ""
        raise CheckpointError(f"{path}: has no tensors at its top level, so it is not a state_dict{hint}")
    roles = {"running_mean": "mean", "running_var": "var", "weight": "gamma", "bias": "beta",
             "num_batches_tracked": "count"}

    def stats_prefix(k: str) -> tuple[str, str] | None:
        for suffix, role in (("running_mean", "mean"), ("running_var", "var")):
            if k == suffix or k.endswith("." + suffix):
                return k[: -len(suffix) - 1] if k != suffix else "", role
        return None

    groups = _group(list(obj), stats_prefix)
    for name, found in groups.items():
        pre = name + "." if name else ""
        for suffix in ("weight", "bias", "num_batches_tracked"):
            if pre + suffix in obj:
                found[roles[suffix]] = pre + suffix
    ckpt = _assemble("torch", obj, groups, list(obj))
    ckpt.metadata = getattr(obj, "_metadata", None)
    return ckpt


def _gluon_split(k: str) -> tuple[str, str, str, str] | None:
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


def _read_gluon(path: str, head: bytes) -> Checkpoint:
    if not head.startswith(_MX_MAGIC):
        raise CheckpointError(
            f"{path}: not an MXNet parameter file (no NDArray-list header; mx.nd.save files start with 0x112)"
        )
    mx = _framework("mxnet")
    try:
        obj = mx.nd.load(path)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read as an MXNet parameter file, corrupt or truncated ({_first_line(e)})"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds {len(obj)} unnamed arrays (mx.nd.save of a list), not named parameters")
    keys = list(obj)
    stats: dict[str, dict[str, str]] = {}
    for k in keys:
        hit = _gluon_split(k)
        if hit and hit[2] in ("mean", "var"):
            stats.setdefault(hit[1], {})
    groups: dict[str, dict[str, str]] = {}
    for k in keys:
        hit = _gluon_split(k)
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
        return {"symbol": key.startswith("aux:"), "stats": _gluon_split(key)[3]}  # type: ignore[index]

    return _assemble("gluon", obj, groups, keys, style)


def _flatten(tree: Any, prefix: tuple[str, ...], out: dict[tuple[str, ...], Any]) -> None:
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            _flatten(v, (*prefix, str(k)), out)
    else:
        out[prefix] = tree


def _flax_entries(path: str, what: str) -> dict[str, Any]:
    """The leaves of a flax.serialization msgpack file, by path joined with ``/``."""
    serialization = _flax_serialization()
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read as {what} (flax.serialization msgpack), corrupt or truncated ({_first_line(e)})"
        ) from e
    if not isinstance(tree, dict) or not tree:
        raise CheckpointError(f"{path}: holds a {type(tree).__name__}, not a dict of {what}")
    leaves: dict[tuple[str, ...], Any] = {}
    _flatten(tree, (), leaves)
    return {"/".join(p): v for p, v in leaves.items()}


def _read_nnx(path: str, head: bytes) -> Checkpoint:
    entries = _flax_entries(path, "Flax NNX state")

    def split(key: str) -> tuple[str, str] | None:
        layer, _, leaf = key.rpartition("/")
        return (layer, leaf) if leaf in ("mean", "var") else None

    groups = _group(list(entries), split)
    for name, roles in groups.items():
        for leaf, role in (("scale", "gamma"), ("bias", "beta")):
            k = "/".join(filter(None, (name, leaf)))
            if k in entries:
                roles[role] = k
    return _assemble("nnx", entries, groups, list(entries))


def _read_flax(path: str, head: bytes) -> Checkpoint:
    entries = _flax_entries(path, "Flax variable collections")
    stats_roles = {"mean": "mean", "var": "var"}
    param_roles = {"scale": "gamma", "bias": "beta"}

    def split(key: str) -> tuple[str, str] | None:
        coll, _, rest = key.partition("/")
        if coll == "batch_stats" and rest:
            layer, _, leaf = rest.rpartition("/")
            if leaf in stats_roles:
                return layer, stats_roles[leaf]
        return None

    groups = _group(list(entries), split)
    for name, roles in groups.items():
        for leaf, role in param_roles.items():
            k = "/".join(filter(None, ("params", name, leaf)))
            if k in entries:
                roles[role] = k
    return _assemble("flax", entries, groups, list(entries))


def _flax_serialization() -> Any:
    _framework("flax")
    return importlib.import_module("flax.serialization")


# ---- converting values between formats ---------------------------------------------------------------------------
def _to_numpy(v: Any) -> np.ndarray:
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


def _to_torch(v: Any, key: str) -> Any:
    torch = _framework("torch")
    if isinstance(v, torch.Tensor):
        return v
    if not hasattr(v, "shape"):
        return v  # a plain value in a state_dict: torch.save keeps it
    try:
        return torch.from_numpy(np.array(_to_numpy(v), copy=True))
    except (TypeError, CheckpointError) as e:
        raise CheckpointError(f"{key!r} cannot be stored in a torch file: {e}") from e


def _to_mx(v: Any, key: str) -> Any:
    mx = _framework("mxnet")
    if isinstance(v, mx.nd.NDArray):
        return v
    if not hasattr(v, "shape"):
        raise CheckpointError(
            f"{key!r} is a {type(v).__name__}, not an array: an MXNet parameter file holds only arrays"
        )
    a = _to_numpy(v)
    if a.ndim == 0 or a.size == 0:
        raise CheckpointError(
            f"{key!r} has shape {a.shape}: MXNet 1.x parameter files cannot hold 0-d or empty arrays"
        )
    try:
        return mx.nd.array(a, dtype=a.dtype)
    except Exception as e:
        raise CheckpointError(f"{key!r} (dtype {a.dtype}) cannot be stored in an MXNet file: {_first_line(e)}") from e


def _to_flax(v: Any, key: str) -> Any:
    if not hasattr(v, "shape"):
        return v
    try:
        return _to_numpy(v)
    except CheckpointError as e:
        raise CheckpointError(f"{key!r} cannot be stored in a Flax file: {e}") from e


# ---- non-BN entries between Flax and torch/gluon -------------------------------------------------------------------
def entry_parts(fmt: str, key: str) -> tuple[str, str, str]:
    """``(namespace, module, leaf)`` of an entry key in ``fmt``'s notation.

    torch ``features.0.weight`` -> ``("", "features.0", "weight")``; gluon ``arg:conv0_weight`` -> ``("arg:",
    "conv0_", "weight")`` and ``features.0.weight`` -> ``("", "features.0.", "weight")`` (the module keeps its
    separator, as gluon BN layer names do); flax ``params/block/conv/kernel`` -> ``("params", "block/conv",
    "kernel")`` (the namespace is the variable collection).
    """
    if fmt == "torch":
        module, _, leaf = key.rpartition(".")
        return "", module, leaf
    if fmt == "gluon":
        ns = key[:4] if key.startswith(("arg:", "aux:")) else ""
        bare = key[len(ns):]
        cut = max(bare.rfind("."), bare.rfind("_")) + 1
        return ns, bare[:cut], bare[cut:]
    if fmt == "nnx":
        module, _, leaf = key.rpartition("/")
        return "", module, leaf
    coll, _, rest = key.partition("/")
    module, _, leaf = rest.rpartition("/")
    return coll, module, leaf


def join_entry(fmt: str, ns: str, module: str, leaf: str) -> str:
    """The inverse of :func:`entry_parts`."""
    if fmt == "torch":
        return f"{module}.{leaf}" if module else leaf
    if fmt == "gluon":
        return f"{ns}{module}{leaf}"
    return "/".join(p for p in (ns, module, leaf) if p)


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
        a = _to_numpy(value)
    except CheckpointError as e:
        return str(e)
    return new_key, np.ascontiguousarray(np.transpose(a, perm)), True


# ---- writing ----------------------------------------------------------------------------------------------------
def gluon_keys(name: str, style: dict[str, Any]) -> dict[str, str]:
    """role -> key of a gluon BN layer with prefix ``name`` in ``style`` ({"symbol": bool, "stats": word})."""
    arg, aux = ("arg:", "aux:") if style["symbol"] else ("", "")
    word = style["stats"]
    return {"gamma": f"{arg}{name}gamma", "beta": f"{arg}{name}beta",
            "mean": f"{aux}{name}{word}_mean", "var": f"{aux}{name}{word}_var"}


def _gluon_style(layer: BNLayer, style: str | None) -> dict[str, Any]:
    if style is None and layer.gluon_style is not None:
        return layer.gluon_style
    return {"symbol": True, "stats": "moving"} if style == "symbol" else {"symbol": False, "stats": "running"}


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
        if fmt == "torch":
            pre = layer.name + "." if layer.name else ""
            keys = {"gamma": pre + "weight", "beta": pre + "bias", "mean": pre + "running_mean",
                    "var": pre + "running_var"}
        elif fmt == "gluon":
            keys = gluon_keys(layer.name, _gluon_style(layer, gluon_style))
        elif fmt == "nnx":
            pre = layer.name + "/" if layer.name else ""
            keys = {"gamma": f"{pre}scale", "beta": f"{pre}bias", "mean": f"{pre}mean", "var": f"{pre}var"}
        else:
            pre = layer.name + "/" if layer.name else ""
            keys = {"gamma": f"params/{pre}scale", "beta": f"params/{pre}bias", "mean": f"batch_stats/{pre}mean",
                    "var": f"batch_stats/{pre}var"}
        gamma, beta = layer.gamma, layer.beta
        if fmt == "gluon":  # a gluon BatchNorm always has both parameters
            ref_np = _to_numpy(layer.running_var)
            gamma = np.ones_like(ref_np) if gamma is None else gamma
            beta = np.zeros_like(ref_np) if beta is None else beta
        for role, value in (("gamma", gamma), ("beta", beta), ("mean", layer.running_mean), ("var", layer.running_var)):
            if value is not None:
                put(keys[role], value, what)
        if fmt == "torch" and (ckpt.format != "torch" or layer.num_batches_tracked is not None):
            t = layer.num_batches_tracked if layer.num_batches_tracked is not None else batches
            put(keys["mean"][: -len("running_mean")] + "num_batches_tracked", np.asarray(t, dtype=np.int64), what)

    if fmt == "torch":
        out: Any = OrderedDict((k, _to_torch(v, k)) for k, v in flat.items())
        if ckpt.format == "torch" and ckpt.metadata is not None:
            out._metadata = ckpt.metadata
        return out
    if fmt == "gluon":
        return {k: _to_mx(v, k) for k, v in flat.items()}
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


def write_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint, fmt: str, **kwargs: Any) -> None:
    """Save ``ckpt`` as a ``fmt`` file at ``path``, atomically: a failure leaves ``path`` as it was.

    Everything is converted in memory first (:func:`build`, ``kwargs`` go there), then written to a temporary
    file in the same directory and renamed over ``path``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    obj = build(ckpt, fmt, **kwargs)
    if fmt == "torch":
        torch = _framework("torch")
        save: Callable[[str], None] = lambda tmp: torch.save(obj, tmp)  # noqa: E731
    elif fmt == "gluon":
        mx = _framework("mxnet")
        save = lambda tmp: mx.nd.save(tmp, obj)  # noqa: E731
    else:
        data = _flax_serialization().msgpack_serialize(obj)

        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

    atomic_write(os.fspath(path), save)


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
