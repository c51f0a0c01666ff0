"""Which load options go with which backend: the one place that rule is written.

Where it stands: ``GlmModel.load`` (``runtime.api``), ``provider_config`` (``runtime.backends.onnxruntime``) and the
CLI's ``run``/``chat``/``bench`` (``exporter.cli.run``) all call :func:`check_backend_options` before any work. The
rule is the runtime's; callers differ only in how the user spelled each option, so the messages name what the user
typed: the Python API's parameter names (``threads``, ``backend='tensorrt'``) or the CLI's flags (``--threads``,
``--backend tensorrt``), given as a :class:`Spelling`.

The options, by ``GlmModel.load`` parameter:

    engine_dir     backend tensorrt only (and it needs one)
    provider       backend onnxruntime only
    threads        backend onnxruntime only
    io_binding     backend onnxruntime only (given: turned off)
    graph          backend onnxruntime only (given: not "auto"; the fused or the portable graph)
    trt_options    backend onnxruntime with provider tensorrt only (the CLI gives them as --max-batch, ...)
    device         a CUDA device: provider cuda/tensorrt or backend tensorrt, never provider cpu
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from runtime.errors import BackendError

BUILD_COMMAND = "'glm-export trt --model BUNDLE_DIR --out ENGINE_DIR'"
ONNXRUNTIME_ONLY = ("trt_options", "provider", "threads", "io_binding", "graph")  # in the order messages list them


class Spelling:
    """How a caller names the load parameters: by name (the Python API) or by the flags in ``flags`` (the CLI)."""

    def __init__(self, flags: Optional[Mapping[str, str]] = None):
        self.flags = dict(flags or {})

    def name(self, param: str) -> str:
        return self.flags.get(param, param)

    def setting(self, param: str, value: str) -> str:
        """``--backend tensorrt`` on the CLI, ``backend='tensorrt'`` in the API."""
        return f"{self.flags[param]} {value}" if param in self.flags else f"{param}={value!r}"


API_SPELLING = Spelling()


def check_backend_options(backend: str, given: Mapping[str, Sequence[str]], provider: Optional[str] = None,
                          spelling: Spelling = API_SPELLING) -> None:
    """BackendError (one line, naming the options as the user spelled them) when an option given does not apply
    to ``backend`` (and, for onnxruntime, ``provider``: "cpu" when None).

    ``given``: load parameter -> how the user spelled it, for every parameter the user set (one parameter may come
    from several flags: the CLI's --max-batch, --max-seq-len, ... are all ``trt_options``).
    """
    s = spelling
    spelled = [flag for param in ONNXRUNTIME_ONLY for flag in given.get(param, ())]
    if backend == "tensorrt":
        if not given.get("engine_dir"):
            raise BackendError(f"{s.setting('backend', 'tensorrt')} needs {s.name('engine_dir')} ENGINE_DIR, an "
                               f"engine built from the bundle with {BUILD_COMMAND}")
        if spelled:
            raise BackendError(f"{', '.join(spelled)}: onnxruntime options, not used by "
                               f"{s.setting('backend', 'tensorrt')} (an engine's sizes are fixed when "
                               f"'glm-export trt' builds it)")
        return
    if given.get("engine_dir"):
        raise BackendError(f"{s.name('engine_dir')} is for {s.setting('backend', 'tensorrt')}; "
                           f"{s.setting('backend', 'onnxruntime')} runs the bundle's model.onnx")
    provider_name = str(provider or "cpu").strip().lower().partition(":")[0]
    ep = list(given.get("trt_options", ()))
    if ep and provider_name != "tensorrt":
        raise BackendError(f"{', '.join(ep)}: options of onnxruntime's TensorRT execution provider; add "
                           f"{s.setting('provider', 'tensorrt')} (or use {s.setting('backend', 'tensorrt')} "
                           f"{s.name('engine_dir')} ENGINE_DIR)")
    if given.get("device") and provider_name == "cpu":
        raise BackendError(f"{s.name('device')} selects a CUDA device: use it with "
                           f"{s.setting('provider', 'cuda')}/tensorrt or {s.setting('backend', 'tensorrt')}")
