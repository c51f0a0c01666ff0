"""Decode speed of the glm-export runtime against transformers' eager `generate` and onnxruntime-genai, in one run.

    python bench/decode_peers.py [--workdir DIR] [--rounds 3] [--threads 2] [--prompt-len 32] [--new-tokens 64]

One ChatGLM-shaped 288 M-parameter checkpoint in transformers' `glm` layout (`glm-export tiny --size mid --layout hf
--generation glm4`) is the source of all three: our fp32 bundle (`glm-export onnx`), transformers' GlmForCausalLM
(fp32, eager attention) and onnxruntime-genai's fp32 CPU model (its builder, fed a copy of the checkpoint whose
`architectures` says ChatGLMModel, as ../shared/peers.md describes). Batch 1, greedy, the same prompt. The tools run
interleaved, round after round, and the medians are compared as ratios: this machine's absolute speed varies with
its neighbours, the ratios much less. Requires the `bench` extra (onnxruntime-genai).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from _common import common_args, interleaved_medians


def _prepare(work: str, prompt_len: int, new_tokens: int, threads: int):
    ckpt = os.path.join(work, "mid-glm")
    bundle = os.path.join(work, "mid-glm-onnx")
    genai_src, genai = os.path.join(work, "mid-genai-src"), os.path.join(work, "mid-genai-fp32")
    if not os.path.isdir(ckpt):
        subprocess.run([sys.executable, "-m", "exporter.cli", "tiny", "--size", "mid", "--layout", "hf",
                        "--generation", "glm4", "--out", ckpt], check=True)
    if not os.path.isdir(bundle):
        subprocess.run([sys.executable, "-m", "exporter.cli", "onnx", "--model", ckpt, "--out", bundle, "--quiet"],
                       check=True)
    if not os.path.isdir(genai):
        shutil.rmtree(genai_src, ignore_errors=True)
        shutil.copytree(ckpt, genai_src)
        cfg_path = os.path.join(genai_src, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["architectures"] = ["ChatGLMModel"]  # the builder refuses GlmForCausalLM, accepts this
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", genai_src, "-o", genai,
                        "-p", "fp32", "-e", "cpu", "-c", os.path.join(work, "genai-cache")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    genai_cfg_path = os.path.join(genai, "genai_config.json")
    with open(genai_cfg_path) as f:
        gcfg = json.load(f)
    gcfg["search"]["max_length"] = prompt_len + new_tokens  # else it preallocates the whole 8192 context
    gcfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads  # same threads as the others
    with open(genai_cfg_path, "w") as f:
        json.dump(gcfg, f, indent=1)
    return ckpt, bundle, genai


class Ours:
    name = "glm-export runtime (onnxruntime, fp32)"

    def __init__(self, bundle, threads):
        from runtime.api import GlmModel

        self.model = GlmModel.load(bundle, threads=threads)

    def run(self, prompt, new_tokens):
        from runtime.sampling import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=())
        result = self.model.generate(prompt, cfg)
        return result.timings["prefill_ms"], result.timings["decode_tokens_per_s"], list(result.generated_ids)


class Eager:
    name = "transformers eager generate (PyTorch, fp32)"

    def __init__(self, ckpt, threads):
        import torch
        from transformers import GlmForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = GlmForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="eager")
        self.model.eval()
        self.model.generation_config.eos_token_id = None

    def run(self, prompt, new_tokens):
        torch = self.torch
        ids = torch.tensor([prompt])
        with torch.no_grad():
            t0 = time.perf_counter()
            self.model(ids, use_cache=True)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = self.model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            total = time.perf_counter() - t0
        generated = out[0, len(prompt):].tolist()
        return prefill * 1000, (len(generated) - 1) / max(total - prefill, 1e-9), generated


class GenAI:
    name = "onnxruntime-genai 0.18 (fp32, GroupQueryAttention)"

    def __init__(self, path, threads):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(path)
        config.clear_providers()
        self.model = og.Model(config)
        self.threads = threads

    def run(self, prompt, new_tokens):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens,
                                  do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.array(prompt, dtype=np.int32))
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        steps = 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        decode = time.perf_counter() - t0
        return prefill * 1000, steps / max(decode, 1e-9), list(gen.get_sequence(0))[len(prompt):]


def main() -> None:
    args = common_args(__doc__.splitlines()[0]).parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="glm-export-peers-")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    ckpt, bundle, genai_path = _prepare(work, args.prompt_len, args.new_tokens, args.threads)
    prompt = np.random.default_rng(0).integers(10, 700, args.prompt_len).tolist()
    tools = [Ours(bundle, args.threads), Eager(ckpt, args.threads), GenAI(genai_path, args.threads)]
    for tool in tools:  # warm-up
        tool.run(prompt, 4)
    ids = {}  # each tool's generated ids, from its last round

    def measure(tool):
        def run():
            prefill, tps, ids[tool.name] = tool.run(prompt, args.new_tokens)
            return {"prefill_ms": prefill, "decode_tps": tps}

        return run

    med = interleaved_medians({t.name: measure(t) for t in tools}, args.rounds)
    ours, eager, genai = (t.name for t in tools)
    report = {
        "median": med,
        "decode_ratio_vs_eager": med[ours]["decode_tps"] / med[eager]["decode_tps"],
        "decode_ratio_vs_genai": med[ours]["decode_tps"] / med[genai]["decode_tps"],
        "greedy_ids_equal_to_eager": sum(a == b for a, b in zip(ids[ours], ids[eager])),
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "rounds": args.rounds,
    }
    for name, m in med.items():
        print(f"{name:52s} prefill {m['prefill_ms']:7.1f} ms   decode {m['decode_tps']:6.1f} tokens/s")
    print(f"decode ratio vs eager {report['decode_ratio_vs_eager']:.2f}x, vs onnxruntime-genai "
          f"{report['decode_ratio_vs_genai']:.2f}x; greedy ids equal to eager: "
          f"{report['greedy_ids_equal_to_eager']} of {args.new_tokens}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
