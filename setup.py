"""glm-export: ONNX/TensorRT export and edge deployment for the ChatGLM family.

The base install is the runtime (numpy, onnxruntime, tokenizer libraries, click); torch and the ONNX tooling come
with the ``export`` extra, the HTTP server with ``serve``, test tools with ``test``. TensorRT is never a pip
dependency: it comes with JetPack or NVIDIA's packages on the target machine.
"""
from setuptools import find_packages, setup

RUNTIME = [
    "numpy>=1.21",
    "onnxruntime>=1.16",
    "click>=8.0",
    "tqdm>=4.60",
    "sentencepiece>=0.1.99",
    "tiktoken>=0.5",
    "tokenizers>=0.15",
    "jinja2>=3.0",
]
EXPORT = [
    "torch==2.13.0",  # pinned: the CPU build lies on local disk here; any other version downloads gigabytes
    "onnx>=1.16",
    "safetensors>=0.4",
    "onnx-ir>=1.0",  # onnxruntime's INT4 quantizer (MatMulNBits) imports it; glm-export quantize --precision int4
]
SERVE = [  # glm-export serve (runtime.serve): HTTP app, server, SSE, request validation
    "starlette==1.10.0",
    "uvicorn==0.54.0",
    "sse-starlette==3.7.0",
    "pydantic==2.14.4",
]
TEST = SERVE + [
    "openai==3.57.0",  # the serve tests' client
    "httpx==0.28.1",
    "tritonclient[grpc]==2.73.0",  # model_config_pb2: the Triton tests parse every config.pbtxt with it
    "pytest>=8",
    "transformers==5.24.0",  # the independent reference (GlmForCausalLM, Glm4ForCausalLM); never a runtime dep
    "vermin==1.9.2",
    "hypothesis==6.170.17",  # property-based tests over manifests, configs and tokenizer inputs
    "peft==0.21.2",  # LoRA tests: merged export == transformers + peft merge_and_unload (works with transformers 5.24)
    "onnxruntime-genai==0.18.0",  # interop tests: og.Model(bundle) must generate our greedy ids
]

setup(
    name="glm-export",
    version="0.1.0",
    description="ONNX/TensorRT export and a lightweight runtime for ChatGLM2/3, GLM-4-9B and GLM-4-0414",
    packages=find_packages(include=["exporter", "exporter.*", "runtime", "runtime.*", "calibration", "calibration.*"]),
    python_requires=">=3.8",
    install_requires=RUNTIME,
    extras_require={
        "export": EXPORT,
        "serve": SERVE,
        "test": EXPORT + TEST,
        "bench": EXPORT + TEST,  # + onnxruntime-genai (in TEST), the peer bench/decode_peers.py measures
        "gpu": ["onnxruntime-gpu>=1.16"],
    },
    entry_points={"console_scripts": ["glm-export=exporter.cli:main"]},
)
