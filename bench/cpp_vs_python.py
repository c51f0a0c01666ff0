"""Decode speed of the C++ runtime (glm-run) against the Python runtime on the 288 M-parameter mid-size GLM-4 model.

    python bench/cpp_vs_python.py [--workdir DIR] [--rounds 3] [--threads 2] [--prompt-len 32] [--new-tokens 64]
                                  [--glm-run build/cpp/glm-run]

Writes `glm-export tiny --size mid --generation glm4` (random weights), exports it to an fp32 bundle, converts that
with `glm-export quantize --precision int4`, then per round and bundle runs the Python runtime (in process,
a fresh process per round: GlmModel.load(threads=N), a warm-up generation, then the measured one) and glm-run (a
fresh process per round too: --repeat 2, a warm-up generation, then the measured one) on the same random prompt, batch 1, greedy, eos ignored, and compares the median decode tokens/s as a
ratio C++ / Python. The generated ids of both must be equal (checked). Prints a Markdown table and one JSON line.
Bundles are kept in --workdir and reused on a second run. Needs the C++ build (make cpp).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import common_args, interleaved_medians  # noqa: E402  (bench/, the script's directory)


def _cli(*args):
    subprocess.run([sys.executable, "-m", "exporter.cli"] + list(args), check=True, cwd=ROOT)


def prepare(work: str):
    ckpt, fp32, int4 = (os.path.join(work, n) for n in ("mid-glm4-ckpt", "mid-glm4-fp32", "mid-glm4-int4"))
    if not os.path.isdir(ckpt):
        _cli("tiny", "--size", "mid", "--generation", "glm4", "--out", ckpt)
    if not os.path.isdir(fp32):
        _cli("onnx", "--model", ckpt, "--out", fp32, "--quiet")
    if not os.path.isdir(int4):
        _cli("quantize", "--model", fp32, "--out", int4, "--precision", "int4", "--no-eval", "--quiet")
    return {"fp32": fp32, "int4": int4}


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--glm-run", default=os.path.join(ROOT, "build", "cpp", "glm-run"))
    args = parser.parse_args()
    if not os.path.isfile(args.glm_run):
        sys.exit(f"{args.glm_run} is missing: build the C++ runtime first (make cpp)")
    import numpy as np

    from runtime.manifest import read_manifest

    work = args.workdir or tempfile.mkdtemp(prefix="glm-export-cpp-bench-")
    bundles = prepare(work)
    prompts, ids_seen = {}, {}
    for name, path in bundles.items():
        spec = read_manifest(path).spec
        forbidden = set(spec.eos_token_ids) | set(spec.special_tokens.values())
        pool = np.array([i for i in range(spec.vocab_size) if i not in forbidden])
        prompts[name] = np.random.default_rng(0).choice(pool, size=args.prompt_len).tolist()

    def python(name):
        def measure():  # a fresh process per round, like glm-run: load, warm up once, measure once
            code = (
                "import json, sys\n"
                "from runtime.api import GlmModel\n"
                "from runtime.sampling import GenerationConfig\n"
                "path, threads, n, ids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])\n"
                "cfg = GenerationConfig(max_new_tokens=n, eos_token_ids=())\n"
                "m = GlmModel.load(path, threads=threads)\n"
                "m.generate(ids, cfg)\n"
                "print(json.dumps(m.generate(ids, cfg).to_dict()))\n"
            )
            out = subprocess.run([sys.executable, "-c", code, bundles[name], str(args.threads), str(args.new_tokens),
                                  json.dumps(prompts[name])], check=True, capture_output=True, text=True, cwd=ROOT,
                                 env=dict(os.environ, PYTHONPATH=ROOT)).stdout
            r = json.loads(out.strip().splitlines()[-1])
            ids_seen.setdefault((name, "python"), r["generated_ids"])
            return {"decode_tps": r["timings"]["decode_tokens_per_s"], "prefill_ms": r["timings"]["prefill_ms"]}
        return measure

    def cpp(name):
        def measure():
            out = subprocess.run(
                [args.glm_run, "--model", bundles[name], "--threads", str(args.threads), "--prompt-ids",
                 ",".join(map(str, prompts[name])), "--max-new-tokens", str(args.new_tokens), "--ignore-eos",
                 "--repeat", "2", "--json"], check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            ids_seen.setdefault((name, "cpp"), r["generated_ids"])
            return {"decode_tps": r["timings"]["decode_tokens_per_s"], "prefill_ms": r["timings"]["prefill_ms"]}
        return measure

    measures = {}
    for name in bundles:
        measures[f"{name} python"] = python(name)
        measures[f"{name} cpp"] = cpp(name)
    medians = interleaved_medians(measures, args.rounds)
    rows = []
    print("| bundle | Python tok/s | C++ tok/s | C++ / Python | ids equal |")
    print("|---|---|---|---|---|")
    for name in bundles:
        py, cc = medians[f"{name} python"]["decode_tps"], medians[f"{name} cpp"]["decode_tps"]
        same = ids_seen[(name, "python")] == ids_seen[(name, "cpp")]
        rows.append({"bundle": name, "python_tps": round(py, 2), "cpp_tps": round(cc, 2), "ratio": round(cc / py, 3),
                     "python_prefill_ms": round(medians[f"{name} python"]["prefill_ms"], 1),
                     "cpp_prefill_ms": round(medians[f"{name} cpp"]["prefill_ms"], 1), "ids_equal": same})
        print(f"| {name} | {py:.1f} | {cc:.1f} | {cc / py:.2f}x | {same} |")
    print(json.dumps({"threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "rounds": args.rounds, "results": rows}))


if __name__ == "__main__":
    main()
