"""Peak RSS of every export / quantize path on bf16 checkpoints of several sizes, the fit in N, the plan's error.

    python bench/stream_memory.py --workdir DIR [--sizes mid 0.6b 1b] [--out results.jsonl]   # measure
    python bench/stream_memory.py --fit results.jsonl [rerun.jsonl] --workdir DIR               # table + fit

Each size: a bf16 ChatGLM3-shaped checkpoint (``glm-export tiny --size S --dtype bfloat16``, written by a child),
then, one at a time, each path in its own child process whose peak is its ru_maxrss (os.wait4): direct
``onnx --precision fp32|fp16|int8-dynamic|int8|int4`` (verification on), ``quantize --precision
fp16|int8-dynamic|int8|int4`` from the fp32 bundle (``--no-eval``: the accuracy report runs both bundles in
onnxruntime, an fp32 session; see README), and the earlier whole-model flows (``--in-memory``) of fp32 export and
int4 quantize for the time ratio. Beside each peak: ``--dry-run``'s estimate for the same command. The fit is least
squares peak = a + b N (N in billions of parameters) per path, extrapolated to ChatGLM3-6B (6.24 B) and GLM-4-9B
(9.40 B); the plan's own estimate for the published full-size configs is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB = " ".join(["the", "of", "and", "to", "in", "is", "was", "for", "on", "that"])
DIRECT = ("fp32", "fp16", "int8-dynamic", "int8", "int4")
FROM_BUNDLE = ("fp16", "int8-dynamic", "int8", "int4")
CALIB_ARGS = ["--calib-samples", "8", "--calib-seq-len", "32"]


def _cli(*args):
    return [sys.executable, "-m", "exporter.cli", *args]


def measure(cmd):
    """(seconds, peak RSS bytes, stdout) of ``cmd`` in a child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(cmd)} failed: {errors.strip()[-500:]}")
    return seconds, usage.ru_maxrss * 1024, text


def estimate(spec, path):
    """The plan's peak for this path (what ``--dry-run`` prints), computed here: no child, no torch import."""
    from exporter.memory_plan import plan_export

    kind, precision = path.split()
    return plan_export(spec, precision, verify=kind == "direct", calibrate=precision == "int8",
                       from_bundle=kind == "bundle").peak_bytes


def run_size(size, work, results, old_routes, only=None):
    ckpt = os.path.join(work, f"ckpt-{size}")
    calib = os.path.join(work, "calib.txt")
    if not os.path.isfile(calib):
        with open(calib, "w") as f:
            for i in range(40):
                words = CALIB.split()
                f.write(" ".join(words[(i * 7 + k) % len(words)] for k in range(60)) + "\n")
    if not os.path.isdir(ckpt):
        measure(_cli("tiny", "--out", ckpt, "--size", size, "--dtype", "bfloat16"))
    from exporter.config import spec_from_checkpoint

    spec = spec_from_checkpoint(ckpt)[0]
    params = spec.num_params
    fp32 = os.path.join(work, f"b-{size}-fp32")
    jobs = []
    for p in DIRECT:
        extra = ["--calib-data", calib] + CALIB_ARGS if p == "int8" else []
        out = fp32 if p == "fp32" else os.path.join(work, f"d-{size}-{p}")
        jobs.append((f"direct {p}", _cli("onnx", "--model", ckpt, "--out", out, "--precision", p, "--overwrite",
                                         "--quiet", *extra), True))
    for p in FROM_BUNDLE:
        extra = ["--calib-data", calib] + CALIB_ARGS if p == "int8" else []
        jobs.append((f"bundle {p}", _cli("quantize", "--model", fp32, "--out", os.path.join(work, f"q-{size}-{p}"),
                                         "--precision", p, "--no-eval", "--overwrite", "--quiet", *extra), True))
    if old_routes:  # the earlier whole-model flows, for the time ratio
        jobs.append(("in-memory fp32", _cli("onnx", "--model", ckpt, "--out", os.path.join(work, f"m-{size}-fp32"),
                                            "--in-memory", "--overwrite", "--quiet"), False))
        jobs.append(("in-memory bundle-int4", _cli("quantize", "--model", fp32, "--out",
                                                   os.path.join(work, f"m-{size}-q4"), "--precision", "int4",
                                                   "--no-eval", "--in-memory", "--overwrite", "--quiet"), False))
    done = set()
    if os.path.isfile(results.name):
        with open(results.name) as f:
            done = {(r["size"], r["path"]) for r in map(json.loads, filter(str.strip, f))}
    for name, cmd, planned in jobs:
        if (size, name) in done or (only and name not in only):  # done earlier, or not asked for
            continue
        est = estimate(spec, name) if planned else None
        seconds, peak, _ = measure(cmd)
        row = {"size": size, "params": params, "path": name, "seconds": round(seconds, 1), "peak_rss_bytes": peak,
               "estimate_bytes": est}
        print(json.dumps(row), flush=True)
        results.write(json.dumps(row) + "\n")
        results.flush()
    for d in os.listdir(work):  # keep the checkpoint, drop the bundles (disk is shared)
        if d.startswith(("d-", "q-", "m-")) and d.endswith(tuple(["-" + p for p in DIRECT] + ["-q4"])) and size in d:
            subprocess.run(["rm", "-rf", os.path.join(work, d)], check=False)


def fit(paths, workdir=None):
    """The table of the README: peak per size, least-squares fit a + b N, extrapolations, the plan's error (the
    current plan code, recomputed for each size's checkpoint in ``workdir`` when given). Later files override
    earlier rows of the same size and path (re-measurements)."""
    GB = 1024**3
    rows = {}
    for path in paths:
        for line in open(path):
            if line.strip():
                r = json.loads(line)
                rows[(r["size"], r["path"])] = r
    rows = list(rows.values())
    sizes = sorted({(r["params"], r["size"]) for r in rows})
    specs = {}
    if workdir:
        from exporter.config import spec_from_checkpoint

        for _, size in sizes:
            ckpt = os.path.join(workdir, f"ckpt-{size}")
            if os.path.isdir(ckpt):
                specs[size] = spec_from_checkpoint(ckpt)[0]
    names = []
    for r in rows:
        if r["path"] not in names:
            names.append(r["path"])
    print("| path | " + " | ".join(f"{size} ({params / 1e9:.3f} B)" for params, size in sizes)
          + " | fit, GB (N = B params) | ChatGLM3-6B | GLM-4-9B | plan error |")
    print("|---" * (len(sizes) + 5) + "|")
    for name in names:
        pts = {r["size"]: r for r in rows if r["path"] == name}
        xs = [pts[s]["params"] / 1e9 for _, s in sizes if s in pts]
        ys = [pts[s]["peak_rss_bytes"] / GB for _, s in sizes if s in pts]
        cells = " | ".join(f"{pts[s]['peak_rss_bytes'] / GB:.2f} GB ({pts[s]['seconds']:.0f} s)" if s in pts else "-"
                           for _, s in sizes)
        if len(xs) >= 2:
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            a = my - b * mx
            fitted = f"{a:.2f} + {b:.2f} N | {a + 6.24 * b:.1f} | {a + 9.40 * b:.1f}"
        else:
            fitted = "- | - | -"
        errs = []
        kind, _, precision = name.partition(" ")
        for _, s in sizes:
            r = pts.get(s)
            if r is None:
                continue
            if kind in ("direct", "bundle") and s in specs:
                from exporter.memory_plan import plan_export

                est = plan_export(specs[s], precision, verify=kind == "direct", calibrate=precision == "int8",
                                  from_bundle=kind == "bundle").peak_bytes
                errs.append((est - r["peak_rss_bytes"]) / r["peak_rss_bytes"])
        err = ", ".join(f"{100 * e:+.0f}%" for e in errs) if errs else "-"
        print(f"| {name} | {cells} | {fitted} | {err} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--sizes", nargs="+", default=["mid", "0.6b", "1b"])
    parser.add_argument("--out", default="stream_memory.jsonl")
    parser.add_argument("--fit", nargs="+", default=None, help="print the table and fit of results files")
    parser.add_argument("--old-routes-all", action="store_true",
                        help="time the whole-model routes on every size (default: the first size only)")
    parser.add_argument("--no-old-routes", action="store_true", help="streaming paths only")
    parser.add_argument("--paths", nargs="+", default=None, help="only these paths, e.g. 'direct int4'")
    args = parser.parse_args()
    if args.fit:
        fit(args.fit, args.workdir)
        return
    work = args.workdir or tempfile.mkdtemp(prefix="glm-export-stream-")
    os.makedirs(work, exist_ok=True)
    with open(args.out, "a") as results:
        for k, size in enumerate(args.sizes):
            run_size(size, work, results, old_routes=(k == 0 or args.old_routes_all) and not args.no_old_routes,
                     only=args.paths)


if __name__ == "__main__":
    main()
