"""Quantization defaults, each chosen once from a measurement (docs/precision.md has the figures) and imported by
the CLI, the library calls and the memory plan alike. No imports: the CLI reads these at start-up.

INT4: symmetric blocks of 128 along K. On the 288 M mid-size model (onnxruntime CPU, 2 threads, batch 1,
interleaved rounds) block 128 decoded 5-10% faster than block 32 in three of four runs and 2% slower in the fourth
(the machine at its fastest: compute-bound; an fp32 scale per block is 4 of every 20 bytes read per token at block
32, 4 of 68 at 128), and symmetric blocks 5-15% faster than zero points; on the trained fixture the perplexity
cost is +0.19% (block 32: +0.05%) against a +10% bound. Block 128 symmetric is still finer than THUDM's own INT4
form (one scale per output row, no zero point). ``--block-size 32`` (onnxruntime-genai's setting) and
``--int4-asymmetric`` remain.
"""
from __future__ import annotations

INT4_BLOCK_SIZE = 128
INT4_SYMMETRIC = True
