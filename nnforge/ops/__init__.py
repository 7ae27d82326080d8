"""The op families: each module declares its ops' schema, shape rule, numpy reference, torch implementation
and ONNX / TVM lowerings side by side (see nnforge/ir/registry.py and docs/adding-an-op.md).

Imported by ``nnforge.ir.registry.load_ops`` on the registry's first use; every module registers on import.
"""

from . import (  # noqa: F401
    attention,
    conv,
    decode,
    elementwise,
    fallback,
    indexing,
    linalg,
    lowbit,
    merge,
    norm,
    onnx_node,
    reduce,
    region,
    resize,
    shape,
    tokens,
)
