"""TVM used directly, without nnforge: the bench's baseline.

``from_exported_program`` + ``tvm.compile`` with TVM's default Relax pipeline and no schedules or
tuning, which is what a user who reaches for TVM by hand gets. nnforge's own TVM path is tvm.py.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def build_direct(model, example_inputs: Sequence) -> Callable[[], list[np.ndarray]]:
    """Compile ``model`` on the CPU with TVM directly; returns a zero-argument runner on the examples."""
    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        ep = torch.export.export(model, tuple(example_inputs))
    mod = from_exported_program(ep, keep_params_as_input=False)
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    ex = tvm.compile(mod, target=target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(x.numpy(), tvm.cpu()) for x in example_inputs]
    main = vm["main"]

    def run():
        out = main(*args)
        outs = out if isinstance(out, (list, tuple)) or type(out).__name__ == "Array" else [out]
        return [o.numpy() for o in outs]

    return run
