"""glm-export runtime: numpy + onnxruntime (or TensorRT) only.

This package never imports torch, transformers, ``exporter`` or ``calibration``; it reads only the bundle manifest
that the exporter writes.
"""

__version__ = "0.1.0"

# The public API, imported on first use so that ``import runtime`` stays instant (no numpy, no onnxruntime).
_LAZY = {
    "GlmModel": "runtime.api",
    "GenerationResult": "runtime.api",
    "TextStream": "runtime.api",
    "StreamPiece": "runtime.api",
    "GenerationConfig": "runtime.sampling",
    "TrtProviderOptions": "runtime.tensorrt.ep_options",
}
__all__ = ["__version__"] + sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
