"""Register a pass from outside the package and run it in a pipeline.

The pass turns
`relu(relu(x))` into `relu(x)` (idempotent activations), in about ten lines.
"""

import numpy as np

import nnforge
from nnforge import PassContext, PassManager
from nnforge.ir import Graph, TensorType
from nnforge.passes.pattern import P, RewritePass, Rule


@nnforge.register_pass
class DropRepeatedRelu(RewritePass):
    """relu(relu(x)) -> relu(x)."""

    name = "drop_repeated_relu"
    rules = [Rule("relu_relu", P("relu", P("relu", "x", bind="inner")), lambda m, b: m["inner"])]


def main():
    g = Graph("demo")
    x = g.add_input("x", TensorType(("batch", 8)))
    g.outputs = [g.op("relu", g.op("relu", g.op("relu", x)))]
    print(g, "\n")

    sample = [np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)]
    pm = PassManager(["drop_repeated_relu", "dce"], check=True)  # check: compared with the interpreter
    g = pm.run(g, PassContext(sample_inputs=sample))
    print(g, "\n")
    for r in pm.records:
        print(f"{r.name}: {r.nodes_before} -> {r.nodes_after} nodes, max error {r.max_error}, {r.stats}")


if __name__ == "__main__":
    main()
