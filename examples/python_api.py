"""The runtime's Python API, end to end on a tiny random ChatGLM3.

    python examples/python_api.py [BUNDLE_DIR]

Without an argument it first writes a tiny checkpoint and exports it to a bundle in a temporary directory (that
part needs the ``export`` extra: torch); everything after that uses only ``runtime``, which needs numpy and
onnxruntime. The model is random, so the text is gibberish; the calls are the ones you would make on a real bundle.
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_tiny_bundle(workdir: str) -> str:
    """A tiny ChatGLM3 checkpoint, exported and verified (the exporter's job, not the runtime's)."""
    from exporter.onnx_export import export_bundle
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(os.path.join(workdir, "checkpoint"), generation="chatglm3", layout="thudm")
    return export_bundle(ckpt, os.path.join(workdir, "bundle")).bundle_dir


def main(bundle_dir: str) -> None:
    from runtime import GenerationConfig, GlmModel

    with GlmModel.load(bundle_dir, provider="cpu", threads=2) as model:
        spec = model.spec
        print(f"loaded {spec.generation}: {spec.num_layers} layers, vocab {spec.vocab_size}, "
              f"context {spec.max_position_embeddings}")

        # 1. greedy generation from text: one result with ids, text, finish reason and timings
        result = model.generate("Hello, ChatGLM", GenerationConfig(max_new_tokens=16))
        print(f"greedy: {result.text!r} ({result.finish_reason}, {len(result.generated_ids)} tokens, "
              f"prefill {result.timings['prefill_ms']:.1f} ms, {result.timings['decode_tokens_per_s']:.0f} tokens/s)")

        # 2. a batch of prompts of different lengths (left-padded); each stops on its own
        batch = model.generate([[5, 6, 7], "a longer prompt about the weather"], GenerationConfig(max_new_tokens=8))
        for r in batch:
            print(f"batch row: {len(r.prompt_ids)} prompt tokens -> {r.generated_ids} ({r.finish_reason})")

        # 3. seeded sampling with a stop string, streamed piece by piece
        config = GenerationConfig(max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9, top_k=50,
                                  repetition_penalty=1.1, seed=42, stop=("\n",))
        stream = model.stream("Once upon a time", config)
        print("stream: ", end="")
        for piece in stream:
            print(piece.text, end="", flush=True)
        print(f"  [{stream.result.finish_reason}]")

        # 4. chat in the model's own format; stops on its chat stop ids
        reply = model.chat(
            [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is ONNX?"}],
            GenerationConfig(max_new_tokens=16, do_sample=True, seed=0),
        )
        print(f"chat: {reply.text!r} ({reply.finish_reason})")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(make_tiny_bundle(tmp))
