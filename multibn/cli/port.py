"""``multibn port``: convert a checkpoint's BN parameters and running statistics from one framework to another.

Checkpoint files do not record eps, momentum or ``fix_gamma`` (they live in the model code), so the command takes
them: the source and destination conventions (default: each format's own, ``torch``, ``gluon``, ``flax`` for flax
and nnx), ``--src-eps``/``--dst-eps`` for every layer, and per layer ``--layer NAME:KEY=VALUE,...`` or a JSON
``--map FILE``. Each BN layer goes through :func:`multibn.convert_state`; the file through
:mod:`multibn.checkpoints` (layer names, the default renaming rule, every other entry carried unchanged).

The JSON map is an object whose keys are source layer names (as the table prints them; ``""`` or ``"(root)"``
for a bare BN layer) and whose values are either the destination layer name or an object with any of:

* ``"to"``: the destination layer name, in the destination format's notation (torch ``features.1``, gluon
  ``features.1.``, flax ``features_1`` or ``block/bn``, nnx ``features/1`` or ``bn``);
* ``"fix_gamma"``, ``"eps"``, ``"momentum"``: the source layer's settings (momentum in the source convention's
  sense; it matters only to ``--preserve statistics``);
* ``"dst_fix_gamma"``, ``"dst_eps"``: the destination layer's settings;
* ``"count"``: elements per channel per training batch, for ``--preserve statistics``.

A key of the map that is not a BN layer but another entry of the file (``"arg:conv0_weight"``, a flax
``"params/Conv_0/kernel"``) renames that entry: its value is the new key (or ``{"to": key}``). A key that is
the module of other entries (torch ``"0"``, gluon ``"conv0_"``, flax ``"Conv_0"``) renames the module:
``{"0": "Conv_0"}`` with ``--to flax`` writes ``0.weight`` as ``params/Conv_0/kernel``.

Formats: ``torch`` (a ``torch.save`` state_dict), ``gluon`` (an MXNet ``.params`` file), ``flax`` (linen
variables, ``flax.serialization.to_bytes``), ``nnx`` (Flax NNX state as a pure dict,
``to_bytes(nnx.to_pure_dict(nnx.state(model)))``; :mod:`multibn.checkpoints` says how to load it back).

Between torch/gluon and flax/nnx the other entries are placed where the destination model has them
(:func:`multibn.checkpoints.relayout`): ``M.weight`` of rank >= 2 <-> ``params/M/kernel``, transposed between
``(out, in, *spatial)`` and ``(*spatial, in, out)`` (conv OIHW <-> HWIO, dense (out, in) <-> (in, out)),
``bias`` <-> ``bias``, a rank-1 ``weight`` <-> ``scale`` (nnx without the ``params/``); entries with no place
there (buffers, other Flax collections) are listed and left out. Between flax and nnx only the names change;
between torch and gluon every other entry is carried unchanged.

``--layer NAME:KEY=VALUE,...`` takes the same keys (``--layer features.1:fix_gamma=true,eps=1e-3``) and wins
over the map. Exit status: 0 when everything was converted and written; 1 when a layer or entry could not be
converted or a file could not be read or written (nothing is written then); 2 for bad arguments or a bad map.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

from multibn.checkpoints import (
    DEFAULT_CONVENTION,
    FLAX_FAMILY,
    FORMATS,
    GLUON_STYLES,
    BNLayer,
    Checkpoint,
    CheckpointError,
    default_target_name,
    display_name,
    entry_parts,
    join_entry,
    read_checkpoint,
    relayout,
    write_checkpoint,
)
from multibn.conventions import CONVENTIONS, Convention, check_eps, check_momentum, resolve_convention
from multibn.convert import convert_state_verbose  # the changes it reports: not in multibn.convert_state
from multibn.state import BNState

from .usage import UsageError, usage_error

_SETTINGS = {
    "to": str, "fix_gamma": bool, "eps": float, "momentum": float, "count": int,
    "dst_fix_gamma": bool, "dst_eps": float,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Layer names are as the table prints them: torch module names (features.1), gluon prefixes (features.1., "
        "bn0_), flax paths (features_1, block/bn); (root) is a bare BN layer. --map FILE is a JSON object "
        "{source layer: destination name, or {\"to\": name, \"fix_gamma\": true, \"eps\": 1e-3, "
        "\"count\": 512, \"dst_eps\": 1e-5, ...}}; a key naming a non-BN entry renames it. Exit status: 0 "
        "written; 1 something could not be read or converted (nothing written); 2 bad arguments or map."
    )
    parser.add_argument("src", metavar="SRC", help="the source checkpoint file")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="the converted checkpoint to write")
    parser.add_argument("--from", dest="src_format", required=True, choices=FORMATS, help="format of SRC")
    parser.add_argument("--to", dest="dst_format", required=True, choices=FORMATS, help="format of OUT")
    parser.add_argument("--src-convention", metavar="NAME", choices=tuple(CONVENTIONS),
                        help="BN convention of the source model (default: the --from format's own)")
    parser.add_argument("--dst-convention", metavar="NAME", choices=tuple(CONVENTIONS),
                        help="BN convention of the destination model (default: the --to format's own)")
    parser.add_argument("--src-eps", type=float, metavar="E", help="eps of the source model's BN layers")
    parser.add_argument("--src-momentum", type=float, metavar="M",
                        help="momentum the source model trained with, in its convention's sense (only "
                        "--preserve statistics uses it)")
    parser.add_argument("--dst-eps", type=float, metavar="E", help="eps of the destination model's BN layers")
    parser.add_argument("--layer", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="settings of one source layer (repeatable): to, fix_gamma, eps, momentum, count, "
                        "dst_fix_gamma, dst_eps")
    parser.add_argument("--map", metavar="FILE", help="JSON: source layer -> destination name or settings")
    parser.add_argument("--preserve", choices=("inference", "statistics"), default="inference",
                        help="inference: same eval output (default); statistics: running variance rescaled "
                        "between biased and unbiased estimates (needs --count)")
    parser.add_argument("--count", type=int, metavar="N",
                        help="elements per channel in each training batch (N*H*W), for --preserve statistics")
    parser.add_argument("--batches", type=int, metavar="T",
                        help="training batches the source saw, where the file does not record it (gluon, flax, nnx): "
                        "used by --preserve statistics and written as torch's num_batches_tracked (default 0)")
    parser.add_argument("--gluon-style", choices=GLUON_STYLES,
                        help="names of a gluon OUT's BN entries: structural (save_parameters: features.1.gamma, "
                        "features.1.running_mean) or symbol (arg:bn0_gamma, aux:bn0_moving_mean); default: a gluon "
                        "SRC's own, else structural")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as e:
        return usage_error("port", e)
    except CheckpointError as e:
        print(f"multibn port: error: {e}", file=sys.stderr)
        return 1


@dataclasses.dataclass
class _Row:
    src: str
    dst: str
    channels: int | str
    changes: str
    ok: bool


def _run(args: argparse.Namespace) -> int:
    src_conv, dst_conv = _base_conventions(args)
    if args.batches is not None and args.batches < 0:
        raise UsageError(f"--batches must be >= 0, got {args.batches}")
    per_layer = _load_map(args.map) if args.map else {}
    for spec in args.layer:
        name, settings = _parse_layer(spec)
        per_layer.setdefault(name, {}).update(settings)

    src = read_checkpoint(args.src, args.src_format)  # CheckpointError: exit 1
    _check_statistics_count(args, src_conv, dst_conv, per_layer, src.layers)
    renames: dict[str, str] = {}  # entry -> new key
    module_renames: dict[str, str] = {}  # module of other entries -> new module name
    modules = {entry_parts(args.src_format, k)[1] for k in src.other}
    for name in [n for n in per_layer if n not in src.layers and (n in src.other or n in modules)]:
        settings = per_layer.pop(name)
        what = "another entry" if name in src.other else "the module of other entries"
        if set(settings) != {"to"}:
            raise UsageError(
                f"--map/--layer: {name!r} is not a BN layer of {args.src} but {what}: only 'to' (its new "
                f"{'key' if name in src.other else 'name'}) applies to it, got {', '.join(sorted(settings))}"
            )
        (renames if name in src.other else module_renames)[name] = settings["to"]
    unknown = sorted(set(per_layer) - set(src.layers))
    if unknown:
        listed = ", ".join(display_name(n) for n in src.layers) or "none"
        names = ", ".join(repr(display_name(n)) for n in unknown)
        raise UsageError(
            f"--map/--layer: {names} {'is not a BN layer' if len(unknown) == 1 else 'are not BN layers'} of "
            f"{args.src} (its BN layers: {listed})"
        )
    style = args.gluon_style or "structural"  # for the default names; the writer keeps gluon sources' own style
    rows: list[_Row] = []
    layers: dict[str, BNLayer] = {}
    targets: dict[str, str] = {}
    for name, layer in src.layers.items():
        settings = per_layer.get(name, {})
        target = settings.get("to", default_target_name(args.src_format, args.dst_format, name, style))
        row = _Row(display_name(name), display_name(target), layer.channels, "", True)
        rows.append(row)
        if target in targets:
            row.ok, row.changes = False, f"ERROR: {display_name(targets[target])} is also mapped to this name"
            continue
        targets[target] = name
        try:
            converted, changes = _convert_layer(layer, target, settings, src_conv, dst_conv, args)
        except (ValueError, TypeError) as e:
            row.ok, row.changes = False, f"ERROR: {e}"
            continue
        layers[name] = converted
        row.changes = "; ".join(changes) if changes else "unchanged"
    for problem in src.problems:
        name, _, why = problem.partition(": ")
        rows.append(_Row(name, "-", "?", f"ERROR: {why} (not converted)", False))

    print(f"multibn port: {args.src} ({args.src_format}) -> {args.output} ({args.dst_format}), "
          f"preserve {args.preserve}")
    print(f"source convention {src_conv.name} (eps {src_conv.eps:g}{', fix_gamma' if src_conv.fix_gamma else ''}), "
          f"destination convention {dst_conv.name} (eps {dst_conv.eps:g}"
          f"{', fix_gamma' if dst_conv.fix_gamma else ''})")
    if args.src_format == "gluon" and not src_conv.fix_gamma and any(
            (lay.gluon_style or {}).get("stats") == "moving" for lay in src.layers.values()):
        print("note: symbol-API names (moving_mean): if the model used sym.BatchNorm's defaults, its layers had "
              "fix_gamma=True and eps 1e-3; say so with --src-convention mxnet")
    _print_table(rows)
    failed = [r for r in rows if not r.ok]
    if not src.layers and not src.problems:
        print(f"no BN layers found in {args.src}: nothing to convert; not written", file=sys.stderr)
        return 1
    if failed:
        print(f"{len(failed)} of {len(rows)} BN layers could not be converted; {args.output} not written",
              file=sys.stderr)
        return 1
    out = Checkpoint(args.src_format, {}, {}, [], [], src.metadata)
    origin: dict[str, str] = {}
    # torch and gluon share names and layouts; to, from and between the Flax formats entries are placed anew
    crossing = args.src_format != args.dst_format and {args.src_format, args.dst_format} != {"torch", "gluon"}
    left_out: list[tuple[str, str]] = []
    kernels: list[int] = []  # ranks of the kernels transposed
    for kind, ref in src.order:
        if kind == "bn":
            out.layers[layers[ref].name] = layers[ref]
            out.order.append(("bn", layers[ref].name))
            continue
        value = src.other[ref]
        ns, module, leaf = entry_parts(args.src_format, ref)
        if crossing:
            placed = relayout(args.src_format, args.dst_format, ref, value, module=module_renames.get(module),
                              gluon_style=style)
            if isinstance(placed, str) and ref not in renames:
                left_out.append((ref, placed))
                continue
            if not isinstance(placed, str):
                key, value, transposed = placed
                if transposed:
                    kernels.append(len(value.shape))
        elif module in module_renames:
            key = join_entry(args.dst_format, ns, module_renames[module], leaf)
        else:
            key = ref
        key = renames.get(ref, key)  # an entry the map names is written under that name
        if key in origin:
            print(f"multibn port: error: entries {origin[key]!r} and {ref!r} would both be written as {key!r}; "
                  f"{args.output} not written", file=sys.stderr)
            return 1
        origin[key] = ref
        out.other[key] = value
        out.order.append(("other", key))
    try:
        write_checkpoint(args.output, out, args.dst_format, gluon_style=args.gluon_style,
                         batches=args.batches or 0)
    except CheckpointError as e:
        print(f"multibn port: error: {e}; {args.output} not written", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"multibn port: error: cannot write {args.output}: {e}", file=sys.stderr)
        return 1
    notes = []
    if args.src_format == "torch" and args.dst_format != "torch":
        notes.append(f"num_batches_tracked dropped ({args.dst_format} has no counter)")
    if args.src_format != "torch" and args.dst_format == "torch":
        notes.append(f"num_batches_tracked written as {args.batches or 0}")
    if out.other and crossing:
        how = ("OIHW -> HWIO, (out, in) -> (in, out)" if args.dst_format in FLAX_FAMILY
               else "HWIO -> OIHW, (in, out) -> (out, in)")
        notes.append(f"{len(out.other)} other entries placed by the {args.dst_format} layout"
                     + (" under params" if args.dst_format == "flax" else "")
                     + (f" ({len(kernels)} kernels transposed {how})" if kernels else "")
                     + (f", {len(renames)} named by the map" if renames else ""))
    elif out.other:
        renamed = len(renames) + sum(1 for k in src.other if entry_parts(args.src_format, k)[1] in module_renames)
        notes.append(f"{len(out.other)} other entries carried unchanged"
                     + (f" ({renamed} renamed by the map)" if renamed else ""))
    if left_out:
        notes.append(f"{len(left_out)} left out (listed above)")
        print(f"left out: {len(left_out)} entr{'ies' if len(left_out) != 1 else 'y'} with no place in a "
              f"{args.dst_format} model (name them in --map to carry them as they are):")
        for key, why in left_out:
            print(f"  {key}: {why}")
    if 2 in kernels and any(k > 2 for k in kernels):
        print("note: if a dense layer takes a flattened conv output, its kernel rows need reordering too (torch "
              "and MXNet flatten NCHW, Flax NHWC): the checkpoint does not record that, so it is not done")
    print(f"wrote {args.output}: {len(layers)} BN layer{'s' if len(layers) != 1 else ''}"
          + "".join(f"; {n}" for n in notes))
    if any("WARNING" in r.changes or "NOT folded" in r.changes for r in rows):
        print(f"multibn port: warning: {args.dst_format} cannot hold some folded running variances "
              "(see the table)", file=sys.stderr)
    return 0


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


def _base_conventions(args: argparse.Namespace) -> tuple[Convention, Convention]:
    try:
        for flag, value in (("--src-eps", args.src_eps), ("--dst-eps", args.dst_eps),
                            ("--src-momentum", args.src_momentum)):
            if value is not None:
                _finite(value, flag)
        src = resolve_convention(args.src_convention or DEFAULT_CONVENTION[args.src_format], args.src_momentum,
                                 args.src_eps)
        dst = resolve_convention(args.dst_convention or DEFAULT_CONVENTION[args.dst_format], None, args.dst_eps)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e
    if args.count is not None and args.preserve != "statistics":
        raise UsageError("--count is used only with --preserve statistics")
    if args.count is not None and args.count < 2:
        raise UsageError(f"--count must be an integer >= 2 (elements per channel in each training batch), "
                         f"got {args.count}")
    return src, dst


def _check_statistics_count(args: argparse.Namespace, src: Convention, dst: Convention,
                            per_layer: dict[str, dict[str, Any]], layers: dict[str, BNLayer]) -> None:
    """``--preserve statistics`` between a biased and an unbiased running variance needs a count for every layer."""
    if args.preserve != "statistics" or args.count is not None or src.unbiased_running_var == dst.unbiased_running_var:
        return
    missing = [display_name(n) for n in layers if "count" not in per_layer.get(n, {})]
    if missing:
        raise UsageError(
            f"--preserve statistics from {src.name!r} ({'unbiased' if src.unbiased_running_var else 'biased'} "
            f"running variance) to {dst.name!r} ({'unbiased' if dst.unbiased_running_var else 'biased'}) needs "
            f"--count N (elements per channel in each training batch), or a count for layers {', '.join(missing)}"
        )


def _convert_layer(
    layer: BNLayer, target: str, settings: dict[str, Any], src_conv: Convention, dst_conv: Convention,
    args: argparse.Namespace,
) -> tuple[BNLayer, list[str]]:
    src = _with(src_conv, settings.get("fix_gamma"), settings.get("eps"), settings.get("momentum"))
    dst = _with(dst_conv, settings.get("dst_fix_gamma"), settings.get("dst_eps"), None)
    count = settings.get("count", args.count) if args.preserve == "statistics" else None
    tracked = layer.num_batches_tracked if layer.num_batches_tracked is not None else args.batches
    state, gamma, beta, _, changes = convert_state_verbose(
        BNState(layer.running_mean, layer.running_var, tracked), layer.gamma, layer.beta,
        src=src, dst=dst, count=count, preserve=args.preserve,
    )
    out = dataclasses.replace(layer, name=target, running_mean=state.running_mean, running_var=state.running_var,
                              gamma=gamma, beta=beta, num_batches_tracked=layer.num_batches_tracked
                              if layer.num_batches_tracked is not None else args.batches)
    return out, changes


def _with(conv: Convention, fix_gamma: bool | None, eps: float | None, momentum: float | None) -> Convention:
    changes: dict[str, Any] = {}
    if fix_gamma is not None:
        changes["fix_gamma"] = fix_gamma
    if eps is not None:
        changes["eps"] = eps
    if momentum is not None:
        changes["momentum"] = momentum
    return dataclasses.replace(conv, **changes) if changes else conv


# ---- the map and --layer ---------------------------------------------------------------------------------------
def _layer_name(name: str) -> str:
    return "" if name == "(root)" else name


def _setting(layer: str, key: str, value: Any, where: str) -> Any:
    if key not in _SETTINGS:
        raise UsageError(f"{where}: layer {display_name(layer)!r}: unknown setting {key!r} "
                         f"(known: {', '.join(_SETTINGS)})")
    kind = _SETTINGS[key]
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                value = value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if kind is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a layer name (a string), got {value!r}")
            return _layer_name(value)
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"expected an integer, got {value!r}")
            v = int(value)
            if v < 2:
                raise ValueError(f"expected an integer >= 2, got {v}")
            return v
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected a number, got {value!r}")
        v = _finite(float(value), key)
        return check_eps(v) if key.endswith("eps") else check_momentum(v)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: layer {display_name(layer)!r}: {key}: {e}") from None


def _load_map(path: str) -> dict[str, dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise UsageError(f"--map {path}: cannot read it ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--map {path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise UsageError(f"--map {path}: must be a JSON object of source layer -> name or settings, "
                         f"got a {type(raw).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        layer = _layer_name(name)
        if layer in out:
            raise UsageError(f"--map {path}: layer {display_name(layer)!r} appears twice")
        if isinstance(value, str):
            value = {"to": value}
        if not isinstance(value, dict):
            raise UsageError(f"--map {path}: layer {name!r}: expected a destination name or an object of settings, "
                             f"got {value!r}")
        out[layer] = {k: _setting(layer, k, v, f"--map {path}") for k, v in value.items()}
    return out


def _parse_layer(spec: str) -> tuple[str, dict[str, Any]]:
    name, sep, rest = spec.rpartition(":")
    if not sep or not rest:
        raise UsageError(f"--layer {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...], e.g. features.1:fix_gamma=true")
    layer = _layer_name(name)
    settings = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--layer {spec!r}: {item!r} is not KEY=VALUE")
        settings[key.strip()] = _setting(layer, key.strip(), value.strip(), "--layer")
    return layer, settings


def _print_table(rows: list[_Row]) -> None:
    w1 = max([len("layer"), *(len(r.src) for r in rows)])
    w2 = max([len("destination"), *(len(r.dst) for r in rows)])
    print(f"\n{'layer':<{w1}}  {'destination':<{w2}}  {'C':>5}  changes")
    for r in rows:
        print(f"{r.src:<{w1}}  {r.dst:<{w2}}  {r.channels!s:>5}  {r.changes}")
    print()
