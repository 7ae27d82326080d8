"""nnforge: a graph compiler for PyTorch and ONNX models.

fast = nnforge.compile(model, (x,), target="cpu")   # callable like the model
fast.save("out/"); again = nnforge.load("out/")
"""

from .api import LossySettings, compile, export, import_model, load
from .check import check
from .compiled import CompiledModel
from .diffusion import BlockCache, DeepCache, StepCachedDenoiser, TGate, compile_denoiser
from .errors import BundleError, ModelLoadError, NnforgeError, NumericsError, UnsupportedOpError, VerificationError
from .explain import explain
from .ir import Graph, TensorType
from .llm import CompiledLM, KVCompress, PromptPrune, Sampling, compile_lm
from .partition import BuildSettings
from .passes.budget import Budget
from .passes.layers import SkipLayers
from .passes.lowbit import Quantize
from .passes.manager import PIPELINES, Pass, PassContext, PassManager, PassResult, register_pass
from .passes.sparsity import Sparsity
from .passes.tokens import TokenMerge, TokenPrune
from .targets import TARGETS, Target, get_target

__version__ = "0.1.0"
__all__ = [
    "compile",
    "compile_lm",
    "CompiledLM",
    "Sampling",
    "KVCompress",
    "PromptPrune",
    "check",
    "explain",
    "export",
    "load",
    "import_model",
    "CompiledModel",
    "compile_denoiser",
    "StepCachedDenoiser",
    "DeepCache",
    "BlockCache",
    "TGate",
    "Graph",
    "TensorType",
    "Pass",
    "PassContext",
    "PassManager",
    "PassResult",
    "TokenMerge",
    "TokenPrune",
    "SkipLayers",
    "Budget",
    "Quantize",
    "Sparsity",
    "LossySettings",
    "BuildSettings",
    "register_pass",
    "PIPELINES",
    "Target",
    "TARGETS",
    "get_target",
    "NnforgeError",
    "UnsupportedOpError",
    "ModelLoadError",
    "BundleError",
    "VerificationError",
    "NumericsError",
]
