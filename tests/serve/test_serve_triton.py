"""glm-export triton: every config.pbtxt parses as Triton's ModelConfig (tritonclient's protobuf), and the repository's
Python model serves requests through a fake ``triton_python_backend_utils`` with the real module's names and call
shapes (Triton itself ships only as a container and cannot run here)."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import types

import numpy as np
import pytest
from click.testing import CliRunner

from exporter.cli import main
from runtime.api import GlmModel
from runtime.errors import BundleError
from runtime.sampling import GenerationConfig

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import json_format, text_format  # noqa: E402  (tritonclient[grpc] brings protobuf)


@pytest.fixture(scope="module")
def bundle(tiny_models):
    return tiny_models.bundle("serve", tiny_models.checkpoint("serve", "chatglm3", "thudm"))


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("triton") / "repo")
    r = CliRunner().invoke(main, ["triton", "--model", bundle, "--out", out, "--max-batch", "4"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def _parse(path):
    with open(path, encoding="utf-8") as f:
        return text_format.Parse(f.read(), model_config_pb2.ModelConfig())


def test_every_config_parses_as_a_model_config(repo):
    configs = [os.path.join(d, f) for d, _, files in os.walk(repo) for f in files if f == "config.pbtxt"]
    assert len(configs) == 1
    for path in configs:
        cfg = _parse(path)
        assert cfg.name == "glm" and cfg.backend == "python" and cfg.max_batch_size == 0
        assert cfg.model_transaction_policy.decoupled
        names = {i.name: i for i in cfg.input}
        assert not names["text_input"].optional and names["text_input"].data_type == model_config_pb2.TYPE_STRING
        assert all(names[n].optional for n in ("max_tokens", "temperature", "stream", "seed"))
        assert [o.name for o in cfg.output] == ["text_output", "finish_reason"]
        assert cfg.parameters["bundle"].string_value == "bundle" and cfg.parameters["max_batch"].string_value == "4"
    assert os.path.isfile(os.path.join(repo, "glm", "1", "model.py"))
    assert os.path.isfile(os.path.join(repo, "glm", "1", "bundle", "manifest.json"))


def test_existing_out_is_refused_in_one_line(bundle, repo):
    r = CliRunner().invoke(main, ["triton", "--model", bundle, "--out", repo])
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output


# ------------------------------------------------------------------------------------------------ fake backend


def fake_pb_utils():
    """The members of triton_python_backend_utils that model.py uses, with the real call shapes."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, message, code=None):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self._outputs, self._error = list(output_tensors), error

        def output_tensors(self):
            return self._outputs

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    class TritonModelException(Exception):
        pass

    def get_input_tensor_by_name(request, name):
        return next((t for t in request.inputs() if t.name() == name), None)

    def get_output_tensor_by_name(response, name):
        return next((t for t in response.output_tensors() if t.name() == name), None)

    def using_decoupled_model_transaction_policy(model_config):
        return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))

    for obj in (Tensor, TritonError, InferenceResponse, TritonModelException, get_input_tensor_by_name,
                get_output_tensor_by_name, using_decoupled_model_transaction_policy):
        setattr(pb, obj.__name__, obj)
    return pb


class Sender:
    def __init__(self):
        self.responses, self.flags, self.done = [], [], threading.Event()

    def send(self, response=None, flags=0):
        self.responses.append(response)
        self.flags.append(flags)
        if flags == 1:
            self.done.set()

    def is_cancelled(self):
        return False


class Request:
    def __init__(self, pb, **inputs):
        self._inputs = []
        for name, value in inputs.items():
            if isinstance(value, str):
                arr = np.array([value.encode("utf-8")], dtype=np.object_)
            elif isinstance(value, bool):
                arr = np.array([value], dtype=np.bool_)
            elif isinstance(value, float):
                arr = np.array([value], dtype=np.float32)
            else:
                arr = np.array([value], dtype=np.int32 if name != "seed" else np.uint64)
            self._inputs.append(pb.Tensor(name, arr))
        self.sender = Sender()

    def inputs(self):
        return self._inputs

    def get_response_sender(self):
        return self.sender


@pytest.fixture
def pb(monkeypatch):
    module = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def _load_model_py(repo, name="glm"):
    path = os.path.join(repo, name, "1", "model.py")
    spec = importlib.util.spec_from_file_location("triton_model_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel()


def _args(repo, config_path, **overrides):
    cfg = _parse(config_path)
    for key, value in overrides.items():
        cfg.parameters[key].string_value = value
    return {"model_config": json_format.MessageToJson(cfg, preserving_proto_field_name=True),
            "model_repository": os.path.join(repo, "glm"), "model_version": "1", "model_instance_kind": "CPU",
            "model_instance_device_id": "0", "model_name": "glm"}


def _text(pb, response, name="text_output"):
    return pb.get_output_tensor_by_name(response, name).as_numpy()[0].decode("utf-8")


def test_python_model_serves_chat_streamed_and_whole(pb, repo, bundle):
    with GlmModel.load(bundle, threads=1) as ref:
        want = ref.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "green tea"}],
                        GenerationConfig(max_new_tokens=12))
    m = _load_model_py(repo)
    m.initialize(_args(repo, os.path.join(repo, "glm", "config.pbtxt")))
    try:
        whole = Request(pb, text_input="green tea", system="Be brief.", max_tokens=12)
        streamed = Request(pb, text_input="green tea", system="Be brief.", max_tokens=12, stream=True)
        missing = Request(pb, max_tokens=3)
        sampled = [Request(pb, text_input="cup of", temperature=0.8, seed=5, max_tokens=8) for _ in range(2)]
        assert m.execute([whole, streamed, missing] + sampled) is None  # decoupled: responses go to the senders
        for r in [whole, streamed, missing] + sampled:
            assert r.sender.done.wait(30)
            assert r.sender.flags[-1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL and r.sender.flags.count(1) == 1
        (resp,) = whole.sender.responses
        assert not resp.has_error() and _text(pb, resp) == want.text
        assert _text(pb, resp, "finish_reason") == want.finish_reason
        assert "".join(_text(pb, r) for r in streamed.sender.responses) == want.text
        assert len(streamed.sender.responses) > 1
        assert missing.sender.responses[-1].has_error()
        assert "text_input" in missing.sender.responses[-1].error().message()
        a, b = [_text(pb, r.sender.responses[-1]) for r in sampled]
        assert a == b  # seeded: the same draw however the two were batched
    finally:
        m.finalize()


def test_bundle_parameter_cannot_leave_the_model_directory(pb, repo):
    m = _load_model_py(repo)
    with pytest.raises(BundleError, match="must be a path inside"):
        m.initialize(_args(repo, os.path.join(repo, "glm", "config.pbtxt"), bundle="../../../etc"))


def test_python_model_refuses_a_non_decoupled_config(pb, repo):
    m = _load_model_py(repo)
    args = _args(repo, os.path.join(repo, "glm", "config.pbtxt"))
    cfg = json.loads(args["model_config"])
    cfg["model_transaction_policy"]["decoupled"] = False
    args["model_config"] = json.dumps(cfg)
    with pytest.raises(pb.TritonModelException, match="decoupled"):
        m.initialize(args)
