"""Decode and prefill speed of the glm-export runtime against onnxruntime-genai (and transformers), every precision.

    python bench/decode_peers.py [--workdir DIR] [--rounds 5] [--threads 2] [--prompt-len 32] [--new-tokens 64]
                                 [--precisions fp32,int8,int4] [--long-prompt 2048] [--no-eager] [--portable]
                                 [--ours "int4,int4 kv8"]

One ChatGLM-shaped 288 M-parameter checkpoint in transformers' `glm` layout (`glm-export tiny --size mid --layout hf
--generation glm4`'s shape, 65000 rows: the tiny writer keeps a GLM-4 off ChatGLM3's published 65024) is the source
of everything: our bundles (`glm-export onnx`, then `glm-export quantize` to static and dynamic INT8 and to INT4: the
default form (symmetric, blocks of 128), onnxruntime-genai's (symmetric, blocks of 32), blocks of 32 with zero
points, and the default form with an int8 KV cache (`--kv-cache int8`); the runtime runs their fused graph), transformers' GlmForCausalLM (fp32 eager, once, for the greedy ids)
and onnxruntime-genai's CPU models at fp32 / int8 / int4 (its builder, fed a copy of the checkpoint whose
`architectures` says ChatGLMModel, as ../shared/peers.md describes; its `max_length` set to what the run needs and
`intra_op_num_threads` to --threads). Batch 1, greedy, the same prompt.

Per precision the tools are loaded together and run interleaved, round after round (the order reversed every other
round); medians are compared as ratios
(this machine's absolute speed varies with its neighbours, the ratios much less). Also printed: each precision's
share of this machine's memory-bandwidth bound (decode reads every linear weight once per token; bandwidth measured
here with numpy sums over 1 GiB on --threads threads), node counts after onnxruntime's optimizer, and with
--long-prompt the INT4 decode speed after a long prompt. fp16 is not measured: on x86 CPUs onnxruntime upcasts fp16
MatMuls, so an fp16 bundle runs at fp32 speed with fp32 memory (int8 is the CPU choice; fp16 is for GPUs/Jetson).
Requires the `bench` extra (onnxruntime-genai). Prints Markdown tables and one JSON line.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import common_args, interleaved_medians  # noqa: E402  (bench/, the script's directory)

# ours: name -> (quantize arguments or None for the fp32 export, precision group)
OURS = {
    "fp32": (None, "fp32"),
    "int8 static": (["--precision", "int8"], "int8"),
    "int8 dynamic": (["--precision", "int8-dynamic"], "int8"),
    "int4": (["--precision", "int4"], "int4"),  # the default form: symmetric, blocks of 128
    "int4 sym b32": (["--precision", "int4", "--block-size", "32"], "int4"),  # onnxruntime-genai's form
    "int4 asym b32": (["--precision", "int4", "--int4-asymmetric", "--block-size", "32"], "int4"),
    "int4 kv8": (["--precision", "int4", "--kv-cache", "int8"], "int4"),  # the default form, int8 KV cache
}
BYTES_PER_WEIGHT = {"fp32": 4.0, "int8": 1.0, "int4": 0.5}


def _cli(*args):
    subprocess.run([sys.executable, "-m", "exporter.cli"] + list(args), check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def _genai_model(work: str, ckpt: str, precision: str, max_length: int, threads: int) -> str:
    src, out = os.path.join(work, "mid-genai-src"), os.path.join(work, f"mid-genai-{precision}")
    if not os.path.isdir(out):
        if not os.path.isdir(src):
            shutil.copytree(ckpt, src)
            cfg_path = os.path.join(src, "config.json")
            with open(cfg_path) as f:
                cfg = json.load(f)
            cfg["architectures"] = ["ChatGLMModel"]  # the builder refuses GlmForCausalLM, accepts this
            cfg["torch_dtype"] = "float32"  # else it loads (and rounds) the weights in the config's dtype
            with open(cfg_path, "w") as f:
                json.dump(cfg, f)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", src, "-o", out,
                        "-p", precision, "-e", "cpu", "-c", os.path.join(work, "genai-cache")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = os.path.join(out, "genai_config.json")
    with open(path) as f:
        gcfg = json.load(f)
    gcfg["search"]["max_length"] = max_length  # else it preallocates the whole context
    gcfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads  # same threads as the others
    with open(path, "w") as f:
        json.dump(gcfg, f, indent=1)
    return out


def prepare(work: str, names, calib: str):
    ckpt, fp32 = os.path.join(work, "mid-glm"), os.path.join(work, "mid-glm-onnx")
    if not os.path.isdir(ckpt):
        from exporter.tiny.checkpoint import write_tiny_checkpoint

        tmp = ckpt + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_tiny_checkpoint(tmp, generation="glm4", layout="hf", size="mid")
        os.rename(tmp, ckpt)
    if not os.path.isdir(fp32):
        _cli("onnx", "--model", ckpt, "--out", fp32, "--quiet")
    bundles = {}
    for name in names:
        qargs = OURS[name][0]
        if qargs is None:
            bundles[name] = fp32
            continue
        out = os.path.join(work, "mid-" + name.replace(" ", "-"))
        if not os.path.isdir(out):
            _cli("quantize", "--model", fp32, "--out", out, *qargs, "--calib-data", calib, "--calib-samples", "32",
                 "--no-eval", "--quiet")
        bundles[name] = out
    return ckpt, bundles


class Ours:
    def __init__(self, name, bundle, threads, graph="auto"):
        from runtime.api import GlmModel

        self.name = f"glm-export {name}" + (" (portable graph)" if graph == "portable" else "")
        self.model = GlmModel.load(bundle, threads=threads, graph=graph)

    def run(self, prompt, new_tokens):
        from runtime.sampling import GenerationConfig

        result = self.model.generate(prompt, GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=()))
        return result.timings["prefill_ms"], result.timings["decode_tokens_per_s"], list(result.generated_ids)

    def close(self):
        self.model.close()


class Eager:
    name = "transformers eager fp32"

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

    def close(self):
        self.model = None


class GenAI:
    def __init__(self, precision, path, threads):
        import onnxruntime_genai as og

        self.name = f"onnxruntime-genai {og.__version__} {precision}"
        self.og = og
        config = og.Config(path)
        config.clear_providers()
        self.model = og.Model(config)
        self.path = path

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
        # the first generate_next_token only picks the token from the prompt's logits (measured: 0.04 ms, no
        # forward), so `steps` tokens took steps - 1 forwards; ours count decode steps the same way (prefill picks
        # the first token), so both rates are forwards per second of decode
        forwards = steps - 1
        return prefill * 1000, forwards / max(decode, 1e-9), list(gen.get_sequence(0))[len(prompt):]

    def close(self):
        self.model = None


def bandwidth_gbps(threads: int, gib: float = 1.0, repeats: int = 3) -> float:
    """Read bandwidth: ``threads`` threads each summing its share of a ``gib`` GiB float32 array (numpy releases
    the GIL in the reduction); the best of ``repeats``."""
    a = np.ones(int(gib * 1024**3 // 4), dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(repeats):
        ts = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    del a, parts
    return best


def linear_params(spec) -> int:
    h, d = spec.hidden_size, spec.head_dim
    per_layer = h * (spec.num_heads + 2 * spec.num_kv_heads) * d + spec.num_heads * d * h + 3 * h * spec.ffn_hidden_size
    return spec.num_layers * per_layer + spec.vocab_size * h  # + the LM head


def node_counts(bundle: str, genai_path: str):
    from exporter.fused_graph import node_count
    from runtime.manifest import GRAPH_FUSED, read_manifest

    m = read_manifest(bundle)
    ours = os.path.join(bundle, m.graph_file(GRAPH_FUSED))
    portable = os.path.join(bundle, m.model_file)
    genai = os.path.join(genai_path, "model.onnx")
    return {k: (node_count(p, optimized=False), node_count(p, optimized=True))
            for k, p in (("glm-export fused", ours), ("glm-export portable", portable), ("onnxruntime-genai", genai))}


def measure_group(tools, prompt, new_tokens, rounds):
    ids = {}

    def measure(tool):
        def run():
            prefill, tps, ids[tool.name] = tool.run(prompt, new_tokens)
            return {"prefill_ms": prefill, "decode_tps": tps}

        return run

    for tool in tools:  # warm-up
        tool.run(prompt, 4)
    return interleaved_medians({t.name: measure(t) for t in tools}, rounds), ids


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--long-prompt", type=int, default=0, help="also time INT4 decode after a prompt this long")
    parser.add_argument("--no-eager", action="store_true", help="skip transformers (the fp32 greedy-id check)")
    parser.add_argument("--portable", action="store_true", help="also time our portable graph (fp32)")
    parser.add_argument("--ours", default=",".join(OURS), help="our variants to time (comma-separated)")
    parser.set_defaults(rounds=5)
    args = parser.parse_args()
    from exporter.tiny.train import corpus_records
    from runtime.manifest import read_manifest

    work = args.workdir or tempfile.mkdtemp(prefix="glm-export-peers-")
    os.makedirs(work, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    calib = os.path.join(work, "calib.jsonl")
    if not os.path.isfile(calib):
        with open(calib, "w", encoding="utf-8") as f:
            for r in corpus_records(200, seed=5):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    groups = [g for g in args.precisions.split(",") if g]
    wanted = [n.strip() for n in args.ours.split(",") if n.strip()]
    names = [n for n, (_, g) in OURS.items() if g in groups and n in wanted]
    ckpt, bundles = prepare(work, names, calib)
    max_len = max(args.prompt_len, args.long_prompt) + args.new_tokens
    genai = {g: _genai_model(work, ckpt, g, max_len, args.threads) for g in groups}
    spec = read_manifest(bundles[names[0]]).spec
    prompt = np.random.default_rng(0).integers(10, 700, args.prompt_len).tolist()

    bw = bandwidth_gbps(args.threads)
    print(f"bandwidth {bw:.1f} GB/s", flush=True)
    n_linear = linear_params(spec)
    results, equal = {}, {}
    for group in groups:
        tools = [Ours(n, bundles[n], args.threads) for n in names if OURS[n][1] == group]
        if group == "fp32" and args.portable:
            tools.append(Ours("fp32", bundles["fp32"], args.threads, graph="portable"))
        if group == "fp32" and not args.no_eager:
            tools.append(Eager(ckpt, args.threads))
        tools.append(GenAI(group, genai[group], args.threads))
        med, ids = measure_group(tools, prompt, args.new_tokens, args.rounds)
        for t in tools:
            bound = bw * 1e9 / (n_linear * BYTES_PER_WEIGHT[group])
            results[t.name] = dict(med[t.name], group=group, bandwidth_share=med[t.name]["decode_tps"] / bound,
                                   vs_genai_decode=med[t.name]["decode_tps"] / med[tools[-1].name]["decode_tps"],
                                   vs_genai_prefill=med[tools[-1].name]["prefill_ms"] / med[t.name]["prefill_ms"])
            # greedy ids are compared at fp32 only (quantizations differ between tools): with transformers, or
            # without it (--no-eager) with onnxruntime-genai's fp32 model
            ref = ids.get(Eager.name, ids[tools[-1].name]) if group == "fp32" else None
            equal[t.name] = sum(a == b for a, b in zip(ids[t.name], ref)) if ref is not None else None
            r = results[t.name]
            print(f"[{group}] {t.name}: decode {r['decode_tps']:.1f} tok/s ({r['vs_genai_decode']:.2f}x genai), "
                  f"prefill {r['prefill_ms']:.0f} ms, ids equal {equal[t.name]}", flush=True)
        for t in tools:
            t.close()
        del tools
        gc.collect()

    long = {}
    if args.long_prompt and "int4" in groups:
        lp = np.random.default_rng(1).integers(10, 700, args.long_prompt).tolist()
        tools = [Ours(n, bundles[n], args.threads) for n in names if OURS[n][1] == "int4"]
        tools.append(GenAI("int4", genai["int4"], args.threads))
        med, _ = measure_group(tools, lp, args.new_tokens, max(2, args.rounds // 2))
        for t in tools:
            long[t.name] = dict(med[t.name], vs_short=med[t.name]["decode_tps"] / results[t.name]["decode_tps"])
            print(f"[long] {t.name}: {long[t.name]}", flush=True)
            t.close()

    nodes = node_counts(bundles["fp32"], genai[groups[0]]) if "fp32" in groups else {}

    print(f"\nmemory bandwidth ({args.threads} threads, numpy sums over 1 GiB): {bw:.1f} GB/s; linear weights "
          f"{n_linear / 1e6:.1f} M parameters read once per decoded token")
    print(f"batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} threads, "
          f"{args.rounds} interleaved rounds, medians\n")
    print("| tool | decode tok/s | vs genai | prefill ms | genai prefill / ours | bandwidth share | "
          "ids = transformers |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['decode_tps']:.1f} | {r['vs_genai_decode']:.2f}x | {r['prefill_ms']:.0f} | "
              f"{r['vs_genai_prefill']:.2f}x | {100 * r['bandwidth_share']:.0f}% | "
              + (f"{equal[name]}/{args.new_tokens} |" if equal[name] is not None else "- |"))
    if long:
        print(f"\nafter a {args.long_prompt}-token prompt (int4):\n")
        print("| tool | decode tok/s | vs the 32-token prompt | prefill ms |")
        print("|---|---|---|---|")
        for name, r in long.items():
            print(f"| {name} | {r['decode_tps']:.1f} | {r['vs_short']:.2f}x | {r['prefill_ms']:.0f} |")
    if nodes:
        print("\n| graph (fp32) | nodes in the file | after onnxruntime's optimizer |")
        print("|---|---|---|")
        for name, (raw, opt) in nodes.items():
            print(f"| {name} | {raw} | {opt} |")
    print("\nfp16: not timed; on x86 CPUs onnxruntime upcasts fp16 MatMuls (fp32 speed and memory): int8 is the CPU "
          "choice, fp16 the GPU/Jetson one.")
    print(json.dumps({"results": results, "ids_equal_to_reference": equal, "long_prompt": long, "nodes": nodes,
                      "bandwidth_gbps": bw, "threads": args.threads, "rounds": args.rounds,
                      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}, default=int))


if __name__ == "__main__":
    main()
