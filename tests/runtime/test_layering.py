"""The runtime stands alone: it imports and generates with torch and transformers unimportable, never imports
exporter or calibration (runtime/tensorrt/ included), keeps ``import runtime`` light, and stays within Python 3.8."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNTIME = os.path.join(ROOT, "runtime")
FORBIDDEN = ("torch", "transformers", "exporter", "calibration")


def runtime_modules():
    mods = []
    for dirpath, _, files in os.walk(RUNTIME):
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, ".")
                mods.append(rel[: -len(".__init__")] if rel.endswith(".__init__") else rel)
    return sorted(mods)


# Run in a fresh interpreter: a meta_path finder refuses the forbidden packages, then every runtime module is
# imported and (when a bundle is given) a few tokens are generated. Prints a JSON report.
_CHILD = r"""
import importlib, json, sys
FORBIDDEN = %(forbidden)r

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError("blocked for the layering test: " + name)
        return None

sys.meta_path.insert(0, Blocker())
sys.path.insert(0, %(root)r)
failed = {}
for mod in %(modules)r:
    try:
        importlib.import_module(mod)
    except Exception as e:
        failed[mod] = "%%s: %%s" %% (type(e).__name__, e)
generated = None
if %(bundle)r:
    from runtime import GlmModel, GenerationConfig
    with GlmModel.load(%(bundle)r, threads=1) as model:
        res = model.generate("hello", GenerationConfig(max_new_tokens=3, eos_token_ids=()))
        generated = [res.generated_ids, res.text]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
print(json.dumps({"failed": failed, "loaded": loaded, "generated": generated}))
"""


def _child(modules, bundle=""):
    code = _CHILD % {"forbidden": FORBIDDEN, "root": ROOT, "modules": modules, "bundle": bundle}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_runtime_module_imports_and_generates_without_torch(tiny_models):
    ckpt = tiny_models.checkpoint("layering", "chatglm3", "thudm")
    bundle = tiny_models.bundle("layering", ckpt)
    modules = runtime_modules()
    assert {"runtime.api", "runtime.generate", "runtime.sampling", "runtime.backends.onnxruntime"} <= set(modules)
    report = _child(modules, bundle)
    assert report["failed"] == {}
    assert report["loaded"] == []
    ids, text = report["generated"]
    assert len(ids) == 3 and isinstance(text, str)


def test_the_blocker_really_blocks():
    """The child's blocker must make a forbidden import fail, or the test above proves nothing."""
    report = _child(["exporter.cli.run"])
    assert "exporter.cli.run" in report["failed"]
    assert "blocked for the layering test" in report["failed"]["exporter.cli.run"]


def test_import_runtime_is_light():
    code = ("import sys; sys.path.insert(0, %r); import runtime; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'onnxruntime', 'runtime')))" % ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['runtime']"


def _imported_packages(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):  # every import, lazy ones inside functions included
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__"
        ) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            yield node.lineno, node.args[0].value.split(".")[0]


def test_no_runtime_file_imports_forbidden_packages():
    offenders = []
    count = 0
    for dirpath, _, files in os.walk(RUNTIME):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                count += 1
                offenders += [f"{os.path.relpath(path, ROOT)}:{line} imports {pkg}"
                              for line, pkg in _imported_packages(path) if pkg in FORBIDDEN]
    assert count >= 8
    assert offenders == []


def test_runtime_tensorrt_imports_no_exporter_code():
    """runtime/tensorrt/ (profiles, the engine record, the execution provider options) is runtime code: the
    exporter's TensorRT builder imports it, never the other way round; statically and in a fresh interpreter with
    the exporter (and torch, transformers, calibration) unimportable."""
    folder = os.path.join(RUNTIME, "tensorrt")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert {"profiles.py", "engine_record.py", "ep_options.py"} <= set(files)
    offenders = [f"runtime/tensorrt/{name}:{line} imports {pkg}" for name in files
                 for line, pkg in _imported_packages(os.path.join(folder, name)) if pkg in FORBIDDEN]
    assert offenders == []
    modules = [m for m in runtime_modules() if m.startswith("runtime.tensorrt")]
    assert len(modules) >= 4  # the package and its three modules
    report = _child(modules)
    assert report["failed"] == {} and report["loaded"] == []


def test_static_check_catches_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import torch.nn\n    from exporter import cli\n"
                   "    return __import__('transformers')\n")
    assert sorted(pkg for _, pkg in _imported_packages(str(bad))) == ["exporter", "torch", "transformers"]


_BIN_PATH = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


@pytest.mark.skipif(shutil.which("vermin", path=_BIN_PATH) is None,
                    reason="vermin not installed (pip install -e .[test])")
def test_runtime_python38_floor():
    out = subprocess.run(["bash", os.path.join(ROOT, ".ci", "check_py38.sh")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=dict(os.environ, PATH=_BIN_PATH))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Target versions not met" not in out.stdout
