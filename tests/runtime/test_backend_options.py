"""The one backend/option rule (runtime.backend_options), spoken in the API's and in the CLI's words."""
from __future__ import annotations

import pytest

from runtime.backend_options import Spelling, check_backend_options
from runtime.errors import BackendError

CLI = Spelling({"backend": "--backend", "engine_dir": "--engine", "provider": "--provider", "device": "--device",
                "threads": "--threads"})


@pytest.mark.parametrize("backend, given, provider, api, cli", [
    ("tensorrt", {}, None, "backend='tensorrt' needs engine_dir ENGINE_DIR", "--backend tensorrt needs --engine"),
    ("tensorrt", {"engine_dir": ["x"], "threads": ["threads"]}, None,
     "threads: onnxruntime options, not used by backend='tensorrt'", None),
    ("onnxruntime", {"engine_dir": ["x"]}, None, "engine_dir is for backend='tensorrt'; backend='onnxruntime'",
     "--engine is for --backend tensorrt; --backend onnxruntime"),
    ("onnxruntime", {"trt_options": ["trt_options"]}, "cuda:1",
     "trt_options: options of onnxruntime's TensorRT execution provider; add provider='tensorrt'", None),
    ("onnxruntime", {"device": ["device"]}, None, "device selects a CUDA device", "--device selects a CUDA device"),
])
def test_refusals_name_the_options_as_spelled(backend, given, provider, api, cli):
    with pytest.raises(BackendError) as e:
        check_backend_options(backend, given, provider)
    assert api in str(e.value) and len(str(e.value).splitlines()) == 1
    if cli is not None:
        with pytest.raises(BackendError) as e:
            check_backend_options(backend, given, provider, CLI)
        assert cli in str(e.value)


def test_options_that_apply_pass():
    check_backend_options("tensorrt", {"engine_dir": ["e"], "device": ["device"]})
    check_backend_options("onnxruntime", {"trt_options": ["--max-batch"], "device": ["--device"]}, "tensorrt", CLI)
    check_backend_options("onnxruntime", {"threads": ["threads"], "io_binding": ["io_binding"]}, "cpu")
