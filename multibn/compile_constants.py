"""Objects made on first use and read back as constants, also while ``torch.compile`` traces the caller.

Dynamo cannot trace the creation of some objects (an ``autograd.Function`` class, a frozen dataclass). A
:class:`ConstantCache` keeps each object as an attribute of a holder class under a generated name; the lookup of
that name is marked ``assume_constant_result``, so Dynamo runs it at trace time and then reads that one attribute
(guarding on it alone, not on the others). At most ``bound`` objects are kept: past that the cache starts anew.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from typing import Any


class ConstantCache:
    """``cache.get(*key)``: ``make(*key)``, made once per key (the key's parts must be plain Python constants)."""

    def __init__(self, make: Callable[..., Any], bound: int) -> None:
        self.make, self.bound = make, bound
        self.holder = type("Holder", (), {})
        self.names: dict[tuple[Hashable, ...], str] = {}
        self.counter = itertools.count()

    def name(self, *key: Hashable) -> str:
        """The attribute of the holder that keeps ``make(*key)``, made on first use."""
        name = self.names.get(key)
        if name is None:
            if len(self.names) >= self.bound:
                for old in self.names.values():
                    delattr(self.holder, old)
                self.names.clear()
            value = self.make(*key)
            name = f"c{next(self.counter)}"
            setattr(self.holder, name, staticmethod(value) if callable(value) else value)
            self.names[key] = name
        return name

    name._dynamo_marked_constant = True  # type: ignore[attr-defined]  # torch._dynamo.assume_constant_result

    def get(self, *key: Hashable) -> Any:
        return getattr(self.holder, self.name(*key))

    def __len__(self) -> int:
        return len(self.names)


def constant_float(v: float) -> float:
    """``v`` as a plain float. Under torch.compile a float that changed between calls (a layer's momentum or eps) is
    symbolic: ``hex()`` specialises it (a guard on its value), as what is made from it must be a constant."""
    return float.fromhex(float(v).hex())
