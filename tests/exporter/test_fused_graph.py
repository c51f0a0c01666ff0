"""The fused onnxruntime graph (exporter/fused_graph.py) against transformers and against the portable graph:
prefill and cached decode steps through the shared-buffer cache, batch 1 and batch 2 left-padded, every case of
tests/conftest.py CASES (ChatGLM2 interpolation, ChatGLM3, 32k base scaling, GLM-4 THUDM/hf, GLM-4-0414)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import CASES
from onnx_steps import left_padded_batch, reference_greedy, reference_logits
from reference import transformers_model
from runtime import GenerationConfig, GlmModel
from runtime.backends.onnxruntime_fused import FusedOnnxRuntimeBackend, SharedKVCache
from runtime.manifest import FUSED_MODEL_FILE, GRAPH_FUSED, KV_SHARED_BUFFER, read_manifest
from runtime.steps import extend_mask, positions_from_mask
from runtime.tolerances import allowed_diff

TOL = allowed_diff("onnx_vs_transformers", "fp32")


def _reference(ckpt, spec):
    interp = spec.rope_position_scale if spec.rope_scaling == "interpolation" else 1.0
    return transformers_model(ckpt, rope_interpolation=interp)


def _backend(bundle):
    spec = read_manifest(bundle).spec
    return spec, FusedOnnxRuntimeBackend(os.path.join(bundle, FUSED_MODEL_FILE), spec, threads=1)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [(9,), (9, 5)], ids=["batch1", "batch2-leftpad"])
def test_fused_prefill_and_cached_decode_match_transformers(tiny_models, case, lengths):
    ckpt, bundle = tiny_models.case(case)  # the default export: streamed (exporter.stream_export)
    assert "streamed_export" in read_manifest(bundle).extra
    _check_against_transformers(ckpt, bundle, lengths)


def _check_against_transformers(ckpt, bundle, lengths):
    """The bundle's fused graph through the shared-buffer cache: prefill and 4 cached decode steps against
    transformers within the fp32 tolerance, the buffer appended in place."""
    spec, be = _backend(bundle)
    ref = _reference(ckpt, spec)
    ids, mask = left_padded_batch(spec.vocab_size, lengths, seed=1)
    cache = be.empty_cache(len(lengths), capacity=ids.shape[1] + 4)  # exactly the positions used: no growth
    got, cache = be.forward_all(ids, mask, positions_from_mask(mask), cache)
    want = reference_logits(ref, ids, mask)
    real = mask > 0
    assert np.abs(got - want)[real].max() <= TOL
    buffer = cache.tensors[0]
    rng = np.random.default_rng(2)
    for step in range(4):
        tok = rng.integers(0, spec.vocab_size, len(lengths))
        new_mask = extend_mask(mask)
        got_step, cache = be.forward(tok[:, None], new_mask, positions_from_mask(new_mask)[:, -1:], cache)
        ids, mask = np.concatenate([ids, tok[:, None]], 1), new_mask
        want_step = reference_logits(ref, ids, mask)[:, -1]
        diff = np.abs(got_step - want_step).max()
        assert diff <= TOL, f"decode step {step + 1}: max diff {diff}"
    assert cache.tensors[0] is buffer and cache.length == ids.shape[1]  # appended in place, never reallocated


@pytest.mark.parametrize("generation", ["chatglm3", "glm4"])
def test_default_cli_export_writes_a_fused_graph_matching_transformers(tiny_models, tmp_path, generation):
    """``glm-export onnx --model CKPT --out B`` with no other option: the streamed export, and its bundle carries
    the fused graph, verified at export and recorded, which matches transformers batch 1 and batch 2 left-padded."""
    from click.testing import CliRunner

    from exporter.cli import main

    ckpt = tiny_models.checkpoint("cli-" + generation, generation, "thudm")
    out = str(tmp_path / "bundle")
    res = CliRunner().invoke(main, ["onnx", "--model", ckpt, "--out", out, "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out)
    assert "streamed_export" in manifest.extra  # the default path is the streaming one
    assert manifest.extra["graphs_decided"] == {"fused": "written"}
    assert manifest.graphs[GRAPH_FUSED]["file"] == FUSED_MODEL_FILE and FUSED_MODEL_FILE in manifest.files
    diffs = manifest.verification["max_abs_diff"]
    assert {f"fused.logits.{s}" for s in ("prefill", "decode1", "decode2", "decode3")} <= set(diffs)
    assert max(diffs.values()) <= manifest.verification["allowed_max_abs_diff"]
    for lengths in ((9,), (9, 5)):
        _check_against_transformers(ckpt, out, lengths)
    with GlmModel.load(out, threads=1) as model:
        assert isinstance(model.backend, FusedOnnxRuntimeBackend)  # and the runtime picks it


def test_streamed_fused_graph_is_the_in_memory_one(tiny_models):
    """The streamed export's fused graph (built over the streamed portable graph's tensors) equals the whole-model
    export's node for node and tensor for tensor (fp32 weights are bit for bit the same on both paths)."""
    import onnx
    from onnx import numpy_helper

    ckpt, streamed = tiny_models.case("glm4_0414-hf")
    in_memory = tiny_models.bundle("glm4_0414-hf-in-memory", ckpt, streaming=False)
    a, b = (onnx.load(os.path.join(d, FUSED_MODEL_FILE)) for d in (streamed, in_memory))
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    wa = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    wb = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert sorted(wa) == sorted(wb)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert read_manifest(streamed).graphs[GRAPH_FUSED] == read_manifest(in_memory).graphs[GRAPH_FUSED]


@pytest.mark.parametrize("case", ["chatglm3-thudm-hd32", "glm4_0414-hf", "glm4-thudm", "chatglm2_32k-thudm-interp"])
@pytest.mark.parametrize("lengths", [(6,), (6, 3)], ids=["batch1", "batch2-leftpad"])
def test_fused_greedy_32_tokens_equal_transformers_generate(tiny_models, case, lengths):
    ckpt, bundle = tiny_models.case(case)
    with GlmModel.load(bundle, threads=1) as model:
        assert isinstance(model.backend, FusedOnnxRuntimeBackend)  # the default graph of the runtime
        spec = model.spec
        ids, mask = left_padded_batch(spec.vocab_size, lengths, seed=3)
        prompts = [row[m > 0].tolist() for row, m in zip(ids, mask)]
        eos = spec.eos_token_ids
        got = [r.generated_ids for r in model.generate(prompts, GenerationConfig(max_new_tokens=32))]
    want = reference_greedy(_reference(ckpt, spec), ids, mask, 32, eos)
    assert got == want
    assert max(len(g) for g in got) > 1


def test_chunked_prefill_batch2_and_buffer_growth_match_one_shot(tiny_models):
    """Chunks of 3 over a left-padded batch of 2 (a multi-token chunk after a past), in a buffer too small for the
    prompt (it must grow), give the one-shot logits."""
    _, bundle = tiny_models.case("glm4-thudm")
    spec, be = _backend(bundle)
    ids, mask = left_padded_batch(spec.vocab_size, (10, 4), seed=4)
    pos = positions_from_mask(mask)
    whole, _ = be.forward_all(ids, mask, pos, be.empty_cache(2, capacity=10))
    cache = be.empty_cache(2, capacity=4)
    parts = []
    for start in range(0, 10, 3):
        end = min(start + 3, 10)
        logits, cache = be.forward_all(ids[:, start:end], mask[:, :end], pos[:, start:end], cache)
        parts.append(logits)
    assert cache.capacity >= 10 and cache.length == 10
    chunked = np.concatenate(parts, axis=1)
    assert np.abs(chunked - whole)[mask > 0].max() <= TOL


def test_decode_binding_is_reused_and_its_logits_are_copies(tiny_models):
    """forward binds a cache's buffers once (the same IOBinding every step, logits into one preallocated buffer) and
    returns copies: a step's logits stay what they were after the next step, and equal forward_all's last row from
    the same cache state; growing the buffer makes a new binding."""
    _, bundle = tiny_models.case("glm4-thudm")
    spec, be = _backend(bundle)
    ids, mask = left_padded_batch(spec.vocab_size, (6, 3), seed=6)
    _, cache = be.forward_all(ids, mask, positions_from_mask(mask), be.empty_cache(2, capacity=8))
    m1 = extend_mask(mask)
    first, cache = be.forward(np.array([[3], [4]]), m1, positions_from_mask(m1)[:, -1:], cache)
    binding, kept = cache.binding, first.copy()
    assert binding is not None and cache.logits is not None
    m2 = extend_mask(m1)
    # the same state two ways: forward_all (a fresh binding) on a copy of the cache, then forward (the kept one)
    twin = be._from_host([a.copy() for a in be._host_arrays(cache)], cache.length)
    want, _ = be.forward_all(np.array([[5], [6]]), m2, positions_from_mask(m2)[:, -1:], twin)
    second, cache = be.forward(np.array([[5], [6]]), m2, positions_from_mask(m2)[:, -1:], cache)
    assert cache.binding is binding
    assert np.array_equal(first, kept)  # not overwritten by the second step
    assert not np.shares_memory(second, cache.logits)
    assert np.abs(second - want[:, -1]).max() <= TOL
    m3 = extend_mask(m2)  # length 9 > capacity 8: the buffer grows, with a binding of its own
    third, grown = be.forward(np.array([[7], [8]]), m3, positions_from_mask(m3)[:, -1:], cache)
    assert grown.capacity >= 9 and grown.binding is not None and grown.binding is not binding
    assert np.isfinite(third).all()


def test_finished_rows_leave_the_shared_buffer(tiny_models):
    """select_rows keeps the chosen rows' cache: the remaining row decodes as if alone."""
    _, bundle = tiny_models.case("chatglm3-thudm-hd32")
    spec, be = _backend(bundle)
    ids, mask = left_padded_batch(spec.vocab_size, (7, 4), seed=5)
    _, both = be.forward_all(ids, mask, positions_from_mask(mask), be.empty_cache(2, capacity=12))
    alone_ids = ids[1:, 3:]
    alone_mask = mask[1:, 3:]
    _, alone = be.forward_all(alone_ids, alone_mask, positions_from_mask(alone_mask), be.empty_cache(1, 12))
    kept = be.select_rows(both, np.array([1]))
    assert isinstance(kept, SharedKVCache) and kept.batch == 1
    tok = np.array([[11]])
    m2 = extend_mask(mask[1:])
    a, _ = be.forward(tok, m2, positions_from_mask(m2)[:, -1:], kept)
    m1 = extend_mask(alone_mask)
    b, _ = be.forward(tok, m1, positions_from_mask(m1)[:, -1:], alone)
    assert np.abs(a - b).max() <= TOL


def test_fused_graph_is_small_and_recorded(tiny_models):
    from exporter.fused_graph import node_count

    _, bundle = tiny_models.case("glm4_0414-hf")
    manifest = read_manifest(bundle)
    rec = manifest.graphs[GRAPH_FUSED]
    assert rec["file"] == FUSED_MODEL_FILE and rec["kv_cache"] == KV_SHARED_BUFFER
    assert FUSED_MODEL_FILE in manifest.files
    assert all(k.startswith("fused.") or not k.startswith("fused") for k in manifest.verification["max_abs_diff"])
    assert "fused.logits.decode3" in manifest.verification["max_abs_diff"]
    path = os.path.join(bundle, FUSED_MODEL_FILE)
    layers = manifest.spec.num_layers
    # 14 nodes a layer (bias add and two sandwich norms) + embedding, lengths and mask, LM head
    assert node_count(path, optimized=False) <= 14 * layers + 25
    assert node_count(path, optimized=True) <= node_count(path, optimized=False)
    assert node_count(os.path.join(bundle, manifest.model_file), optimized=False) > 5 * node_count(path, False)


def test_portable_graph_still_chosen_for_tensorrt_and_on_request(tiny_models):
    from runtime.api import choose_graph
    from runtime.errors import BackendError

    _, bundle = tiny_models.case("chatglm3-thudm-hd32")
    manifest = read_manifest(bundle)
    assert choose_graph(manifest, "cpu") == "fused"
    assert choose_graph(manifest, "tensorrt") == "portable"
    assert choose_graph(manifest, "cpu", "portable") == "portable"
    with pytest.raises(BackendError, match="unknown graph"):
        choose_graph(manifest, "cpu", "turbo")
    with GlmModel.load(bundle, graph="portable", threads=1) as model:
        assert not isinstance(model.backend, FusedOnnxRuntimeBackend)
