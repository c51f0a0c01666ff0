"""glm-export exporter: ChatGLM checkpoints -> ONNX bundles (and TensorRT engines).

Imports torch and onnx lazily inside the functions that need them, so ``glm-export --help`` stays instant.
"""
