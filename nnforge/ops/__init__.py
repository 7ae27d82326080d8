"""The op families: each module declares its ops' schema, shape rule, numpy reference, torch implementation
and ONNX / TVM lowerings side by side (see nnforge/ir/registry.py and docs/adding-an-op.md).

Imported by ``nnforge.ir.registry.load_ops`` on the registry's first use; every module registers on import.
"""

from . import attention, conv, elementwise, fallback, linalg, lowbit, norm, reduce, region, shape, tokens  # noqa: F401
