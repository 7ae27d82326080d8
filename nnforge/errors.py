"""Every error nnforge raises on purpose derives from NnforgeError, so callers can catch one type."""


class NnforgeError(Exception):
    """Base class of nnforge's own errors."""


class UnsupportedOpError(NnforgeError):
    """A frontend or backend met operators it cannot handle; lists all of them at once."""

    def __init__(self, items, where=""):
        # items: list of (op, location) pairs
        self.items = list(items)
        lines = [f"  {op}" + (f"  at {loc}" if loc else "") for op, loc in self.items]
        head = f"{len(self.items)} unsupported operator(s)" + (f" in {where}" if where else "")
        super().__init__(head + ":\n" + "\n".join(lines))


class ModelLoadError(NnforgeError):
    """A model file (ONNX, IR JSON) is malformed, truncated or hostile."""


class BundleError(NnforgeError):
    """A saved bundle is missing, tampered with, or of another format/target."""


class VerificationError(NnforgeError):
    """The IR broke an invariant (SSA, order, types)."""


class NumericsError(NnforgeError):
    """A lossless pass changed the model's outputs beyond tolerance."""
