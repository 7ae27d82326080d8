"""The op families: each module declares its ops' schema, shape rule, numpy reference, torch implementation
and ONNX / TVM lowerings side by side (see nnforge/ir/registry.py and docs/adding-an-op.md).

Imported by ``nnforge.ir.registry.load_ops`` on the registry's first use; every module registers on import.
"""
from ..ir import ops as _legacy  # noqa: F401  (ops not yet moved into a family module)
from . import attention, conv, linalg  # noqa: F401
from . import fallback  # noqa: F401
from . import lowbit  # noqa: F401
from . import norm  # noqa: F401
from . import shape  # noqa: F401
from . import tokens  # noqa: F401
from . import elementwise  # noqa: F401
from . import reduce  # noqa: F401
from . import region  # noqa: F401
