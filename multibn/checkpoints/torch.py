"""The torch format: a ``state_dict`` saved with ``torch.save``, read with ``torch.load(weights_only=True)``.

A BN layer is a module name ``L`` with ``L.running_mean`` and ``L.running_var``, and optionally ``L.weight``,
``L.bias`` and ``L.num_batches_tracked``. Layer names are module names (``features.1``; ``""`` for a bare BN
module). torch is imported only when a file is read or written.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .base import BNLayer, Checkpoint, CheckpointError, Format, assemble, first_line, framework, group_keys, to_numpy

_TORCH_MAGIC_ZIP = b"PK\x03\x04"
_ROLES = {"running_mean": "mean", "running_var": "var", "weight": "gamma", "bias": "beta",
          "num_batches_tracked": "count"}


def read(path: str, head: bytes) -> Checkpoint:
    torch = framework("torch")
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
        raise CheckpointError(f"{path}: cannot read as a torch state_dict: {what} ({first_line(e)})") from e
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)"
        )
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
        hint = f"; save the model's state_dict itself (this file nests mappings under {nested[:3]})" if nested else ""
        raise CheckpointError(f"{path}: has no tensors at its top level, so it is not a state_dict{hint}")

    def stats_prefix(k: str) -> tuple[str, str] | None:
        for suffix, role in (("running_mean", "mean"), ("running_var", "var")):
            if k == suffix or k.endswith("." + suffix):
                return k[: -len(suffix) - 1] if k != suffix else "", role
        return None

    groups = group_keys(list(obj), stats_prefix)
    for name, found in groups.items():
        pre = name + "." if name else ""
        for suffix in ("weight", "bias", "num_batches_tracked"):
            if pre + suffix in obj:
                found[_ROLES[suffix]] = pre + suffix
    ckpt = assemble("torch", obj, groups, list(obj))
    ckpt.metadata = getattr(obj, "_metadata", None)
    return ckpt


def layer_entries(layer: BNLayer, ckpt: Checkpoint, gluon_style: str | None, batches: int) -> list[tuple[str, Any]]:
    """The entries of ``layer`` in a state_dict: ``weight``, ``bias``, the running statistics and, for a layer
    from another format (or one that had it), ``num_batches_tracked`` (``batches`` where it had none)."""
    pre = layer.name + "." if layer.name else ""
    out = [(pre + key, value) for key, value in (("weight", layer.gamma), ("bias", layer.beta),
                                                 ("running_mean", layer.running_mean),
                                                 ("running_var", layer.running_var)) if value is not None]
    if ckpt.format != "torch" or layer.num_batches_tracked is not None:
        t = layer.num_batches_tracked if layer.num_batches_tracked is not None else batches
        out.append((pre + "num_batches_tracked", np.asarray(t, dtype=np.int64)))
    return out


def _to_torch(v: Any, key: str) -> Any:
    torch = framework("torch")
    if isinstance(v, torch.Tensor):
        return v
    if not hasattr(v, "shape"):
        return v  # a plain value in a state_dict: torch.save keeps it
    try:
        return torch.from_numpy(np.array(to_numpy(v), copy=True))
    except (TypeError, CheckpointError) as e:
        raise CheckpointError(f"{key!r} cannot be stored in a torch file: {e}") from e


def to_file(flat: dict[str, Any], owner: dict[str, str], ckpt: Checkpoint) -> Any:
    """The state_dict of the entries ``flat`` (key -> value), with the source's ``_metadata`` when it was torch's."""
    out: Any = OrderedDict((k, _to_torch(v, k)) for k, v in flat.items())
    if ckpt.format == "torch" and ckpt.metadata is not None:
        out._metadata = ckpt.metadata
    return out


def saver(obj: Any) -> Callable[[str], None]:
    torch = framework("torch")
    return lambda tmp: torch.save(obj, tmp)


FORMAT = Format(read, layer_entries, to_file, saver)
