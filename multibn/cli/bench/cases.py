"""What ``multibn bench`` measures: the cases (``nchw_AxBxCxD`` with channel axis 1, ``nhwc_AxBxCxD`` with channel
axis 3 or ``nc_AxB``, optionally with ``:dtype``), the passes, the implementations, and the data of a case."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

KERAS_BACKENDS = ("torch", "jax")
#: "layer": the framework layer's training forward and backward (multibn's layer against the native layer);
#: "mem": the peak memory of the fwd+bwd pass, one fresh subprocess per implementation (:mod:`.memory`)
#: "layer-mem": the peak memory of the layer pass, as "mem" measures it
PASSES = ("fwd", "fwd+bwd", "layer", "mem", "layer-mem")
#: the passes that measure peak memory instead of time (with the pass whose calls each measures)
MEM_OF = {"mem": "fwd+bwd", "layer-mem": "layer"}
DEFAULT_PASSES = ("fwd", "fwd+bwd")
DEFAULT_CASES = ("nchw_64x64x56x56", "nhwc_64x56x56x64", "nchw_256x256x14x14", "nc_4096x1024",
                 "nchw_256x256x14x14:float16")
#: ``--small``: where real models spend their BN calls, and where the fixed cost of a call dominates
SMALL_CASES = ("nc_32x64", "nc_256x128", "nchw_32x16x8x8")
SMALL_PASSES = ("fwd", "layer")
#: ``--cases resnet``: the BN input shapes of a CIFAR ResNet-18 of width 32 (:mod:`.models`) at batch 32 and 8,
#: NCHW and the same memory as NHWC (torch: the channels_last memory format), float32; passes ``RESNET_PASSES``
RESNET_SHAPES = ((32, 32, 32, 32), (32, 64, 16, 16), (32, 128, 8, 8), (32, 256, 4, 4), (8, 32, 32, 32),
                 (8, 256, 4, 4))
RESNET_CASES = tuple(f"{layout}_{n}x{'x'.join(str(d) for d in dims)}" for n, c, h, w in RESNET_SHAPES
                     for layout, dims in (("nchw", (c, h, w)), ("nhwc", (h, w, c))))
RESNET_PASSES = ("layer", "layer-mem")
#: case presets: a name given to ``--cases`` that stands for these cases (and, without ``--passes``, passes)
CASE_PRESETS = {"resnet": (RESNET_CASES, RESNET_PASSES)}
QUICK_CASES = ("nchw_256x256x14x14", "nc_4096x1024")
#: the implementations, in the order of the table's rows
IMPL_ORDER = ("multibn", "multibn-compiled", "keras", "native", "roofline")


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    dtype: str
    axis: int = 1

    @classmethod
    def parse(cls, spec: str) -> Case:
        name, _, dtype = spec.partition(":")
        m = re.fullmatch(r"(nchw|nhwc|nc)_(\d+(?:x\d+)*)", name)
        shape = tuple(int(d) for d in m.group(2).split("x")) if m else ()
        if not m or len(shape) != len(m.group(1)):
            raise ValueError(f"case {spec!r}: expected nchw_AxBxCxD, nhwc_AxBxCxD or nc_AxB, optionally with :dtype")
        dtype = dtype or "float32"
        if dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise ValueError(f"case {spec!r}: dtype must be float16, bfloat16, float32 or float64")
        return cls(name, shape, dtype, 3 if m.group(1) == "nhwc" else 1)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (8 if self.dtype == "float64" else 4 if self.dtype == "float32" else 2)


def make_data(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (offset normal data), dy, gamma, beta as float32 NumPy arrays (cast per backend)."""
    rng = np.random.default_rng(0)
    c = case.shape[case.axis]
    x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal(case.shape, dtype=np.float32)
    gamma = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(c)).astype(np.float32)
    return x, dy, gamma, beta



Runner = Callable[[], None]  # one repetition, device-synchronised


class Skip(Exception):
    """This implementation cannot run this case here (the reason is the message)."""


def installed(names: Sequence[str]) -> list[str]:
    """The modules of ``names`` that can be imported here (none is imported)."""
    return [n for n in names if importlib.util.find_spec(n) is not None]


def use_all_torch_threads() -> None:
    """torch on ``OMP_NUM_THREADS`` threads; called before MXNet is imported, which drops torch's thread count."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
