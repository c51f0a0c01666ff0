"""The files onnxruntime-genai needs to run a bundle's fused graph: ``genai_config.json`` and ``model.genai.onnx``.

Where it stands: written beside the fused graph by the exporter (fp32 bundles) and by the precision stage (quantized
bundles), so ``onnxruntime_genai.Model(bundle_dir)`` loads any bundle with a fused graph. (It lives with the other
graph-file writers of the precision stage, which may not import the exporter.)

``model.genai.onnx`` is the fused graph with ``logits_to_keep`` fixed at 0 (every position) instead of an input:
onnxruntime-genai feeds only the inputs it knows. It holds no weights of its own when the fused graph's weights are
external (it points at the same data file); a small bundle's inline weights are copied. The config says
``past_present_share_buffer: true``: genai allocates the max-length buffer and binds it as past and present, as our
runtime does. Its ``max_length`` is the model's context; set it lower (``search.max_length``) to allocate less.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from runtime import graph_contract as gc
from runtime.spec import ModelSpec

GENAI_CONFIG_FILE = "genai_config.json"
GENAI_MODEL_FILE = "model.genai.onnx"


def genai_config(spec: ModelSpec, graph_file: str = GENAI_MODEL_FILE, threads: int = 0) -> Dict[str, Any]:
    """onnxruntime-genai's config for our fused graph (the fields its own builder writes for a ChatGLM model)."""
    session: Dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads:
        session["intra_op_num_threads"] = threads
    eos = list(spec.eos_token_ids)
    return {
        "model": {
            "bos_token_id": eos[0] if eos else 0,
            "context_length": spec.max_position_embeddings,
            "decoder": {
                "session_options": session,
                "filename": graph_file,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {
                    "input_ids": gc.INPUT_IDS,
                    "attention_mask": gc.ATTENTION_MASK,
                    "position_ids": gc.POSITION_IDS,
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": gc.LOGITS,
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": spec.pad_token_id,
            "type": "chatglm",
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": spec.max_position_embeddings, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_files(bundle_dir: str, spec: ModelSpec, fused_file: str) -> List[str]:
    """``model.genai.onnx`` (from ``bundle_dir/fused_file``) and ``genai_config.json``; returns the names written."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(os.path.join(bundle_dir, fused_file), load_external_data=False)
    kept = [i for i in proto.graph.input if i.name != gc.LOGITS_TO_KEEP]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    proto.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), gc.LOGITS_TO_KEEP))
    onnx.save_model(proto, os.path.join(bundle_dir, GENAI_MODEL_FILE))  # external weights stay where they are
    with open(os.path.join(bundle_dir, GENAI_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(genai_config(spec), f, indent=2)
        f.write("\n")
    return [GENAI_MODEL_FILE, GENAI_CONFIG_FILE]
