"""The package as a whole: importing any module of multibn that is not a framework's own (an adapter, a layer, a
network of ``multibn train``) imports no framework, and neither does running ``batch_norm`` on NumPy arrays.

One fresh interpreter imports every such module in turn and reports what each one pulled in (a fresh process per
module would say the same: each module's imports are in the union); the commands' optional plotting and data
libraries (matplotlib, scikit-learn) count as frameworks here.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import multibn
from tests.helpers import ROOT

HEAVY = ("torch", "jax", "jaxlib", "mxnet", "flax", "keras", "matplotlib", "sklearn")
FRAMEWORK_WORDS = ("torch", "jax", "mxnet", "gluon", "flax", "nnx", "keras")


def framework_free_modules() -> list[str]:
    """Every module of multibn but the ``__main__`` ones (they run a command) and those named after a framework
    (they import it by design)."""
    out = []
    for info in pkgutil.walk_packages(multibn.__path__, "multibn."):
        parts = info.name.split(".")[1:]
        if parts[-1] == "__main__" or any(w in p for p in parts for w in FRAMEWORK_WORDS):
            continue
        out.append(info.name)
    return sorted(out)


SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    heavy, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    pulled, seen = {}, set()
    for name in ["multibn", *modules]:
        importlib.import_module(name)
        now = {h for h in heavy if h in sys.modules}
        pulled[name] = sorted(now - seen)
        seen |= now
    import numpy as np
    import multibn
    y, s = multibn.batch_norm(np.ones((3, 2), np.float32), state=multibn.init_state(2))
    multibn.batch_norm_vjp(np.ones((3, 2), np.float32), None, None, s, np.ones((3, 2), np.float32))
    pulled["batch_norm on NumPy"] = sorted({h for h in heavy if h in sys.modules} - seen)
    print(json.dumps(pulled))
""")


def test_no_framework_module_imports_a_framework() -> None:
    modules = framework_free_modules()
    # the modules the per-area tests named before they were grouped here
    assert {"multibn.layers", "multibn.cli", "multibn.cli.train"} <= set(modules), modules
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(HEAVY), json.dumps(modules)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pulled = json.loads(proc.stdout)
    assert set(pulled) == {"multibn", *modules, "batch_norm on NumPy"}
    assert {m: p for m, p in pulled.items() if p} == {}
