"""glm-export calibration: reduced precision for an fp32 bundle, and what it costs. Imports runtime, never exporter.

    data.py       calibration / evaluation text -> token sequences, seeded held-out split
    feeds.py      sequences -> prefill batches and cached decode steps, run on the float model
    ranges.py     activation statistics -> calibration_ranges.json (the stage boundary)
    qmath.py      quantization arithmetic: scales, histograms, percentile and entropy thresholds
    targets.py    the linear layers a quantizer touches, and --keep-float
    fp16.py       fp32 graph -> fp16 graph with fp32 islands
    quantize.py   static INT8 (Q/DQ, from a ranges file) and dynamic INT8
    int4.py       INT4 weight-only (MatMulNBits)
    embedding.py  the embedding table in fp16
    graph_io.py   reading and writing bundle graphs (external data policy)
    accuracy.py   perplexity, top-1 agreement, KL, logit difference against the fp32 bundle
    pipeline.py   quantize_bundle / evaluate_bundles: the library calls behind `glm-export quantize` / `eval`
    errors.py     CalibrationDataError, QuantizationError
"""
