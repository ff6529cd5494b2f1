"""Layer and entry names of each checkpoint format, and the default rule that maps them between formats.

Within one format names are kept. Between formats a name goes through its canonical form, the dotted module path
of torch (:func:`to_canonical`, :func:`from_canonical`):

* torch and gluon ``save_parameters`` names are the same dotted module path: ``features.1`` <-> ``features.1.``;
  a gluon prefix ending in ``_`` (``batchnorm0_``, symbol API ``bn0_``) reads as ``batchnorm0``; towards a
  symbol-style gluon file dots become underscores (``features.1`` -> ``features_1_``);
* towards flax, a dotted name splits into path components and a numeric component (a ``Sequential`` or
  ``ModuleList`` index) joins the one before it with ``_``, Flax's naming of list attributes:
  ``features.1`` -> ``features_1``, ``layer1.0.bn1`` -> ``layer1_0/bn1``; from flax, a component ending in
  ``_<digits>`` splits back: ``BatchNorm_0`` -> ``BatchNorm.0``, ``layer1_0/bn1`` -> ``layer1.0.bn1``.
  (So a torch module whose own name ends in ``_<digits>``, ``conv_1``, comes back from flax as ``conv.1``:
  name such layers with a map.)
"""

from __future__ import annotations

import re

FORMATS = ("torch", "gluon", "flax", "nnx")
#: the formats whose weights have Flax's layouts (HWIO kernels, ``(in, out)`` dense kernels)
FLAX_FAMILY = ("flax", "nnx")
#: the convention of each format's native BN layer, the default for a file of that format
DEFAULT_CONVENTION = {"torch": "torch", "gluon": "gluon", "flax": "flax", "nnx": "flax"}
GLUON_STYLES = ("structural", "symbol")

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
