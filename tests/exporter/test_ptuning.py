"""P-tuning v2 checkpoints (pre_seq_len, prefix_projection false and true): the exported bundle matches an
independent numpy reference that applies the prefix the way THUDM's modeling_chatglm.py does, through a prefill
and cached decode steps, batch 2 left-padded; a P-tuning output directory merges with --prefix; a checkpoint that
sets pre_seq_len without its prefix encoder is refused."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from exporter.cli import main
from checkpoint_copies import edited_checkpoint
from onnx_steps import OnnxStepper, left_padded_batch
from runtime.tolerances import allowed_diff
from thudm_reference import thudm_logits

PRE_SEQ_LEN = 3


def _prefix_encoder(cfg, projection, seed):
    """Seeded prefix-encoder tensors under THUDM's names, large enough that the prefix moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    kv_size = cfg["num_layers"] * 2 * cfg["multi_query_group_num"] * cfg["kv_channels"]
    h = cfg["hidden_size"]
    out = {"transformer.prefix_encoder.embedding.weight": torch.randn(PRE_SEQ_LEN, kv_size, generator=gen)}
    if projection:
        out.update({
            "transformer.prefix_encoder.trans.0.weight": torch.randn(h, kv_size, generator=gen) / kv_size ** 0.5,
            "transformer.prefix_encoder.trans.0.bias": 0.1 * torch.randn(h, generator=gen),
            "transformer.prefix_encoder.trans.2.weight": 2.0 * torch.randn(kv_size, h, generator=gen) / h ** 0.5,
            "transformer.prefix_encoder.trans.2.bias": 0.1 * torch.randn(kv_size, generator=gen),
        })
    return out


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("pt") / "base"), generation="chatglm3", seed=11,
                                 vocab_size=701)


def _with_prefix(base, out, projection):
    """A copy of ``base`` that carries the prefix encoder in its own weights, as a trained P-tuning model saves."""
    return edited_checkpoint(base, out, {"pre_seq_len": PRE_SEQ_LEN, "prefix_projection": projection},
                             lambda tensors, cfg: tensors.update(_prefix_encoder(cfg, projection, seed=5)))


def _export(ckpt, out, *extra):
    result = CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return str(out)


def _compare_with_reference(bundle, ckpt, prefix_dir=None):
    """Prefill + 3 cached steps through the bundle vs the numpy reference's full recompute; returns prefill logits."""
    stepper = OnnxStepper(bundle)
    ids, mask = left_padded_batch(stepper.spec.vocab_size, (7, 4), seed=2)
    tokens = np.array([[5, 9], [17, 3], [40, 41]])  # (steps, B)
    got = [stepper.start(ids, mask)]
    got += [stepper.step(t) for t in tokens]
    full_ids = np.concatenate([ids, tokens.T], 1)
    full_mask = np.concatenate([mask, np.ones_like(tokens.T)], 1)
    want = thudm_logits(ckpt, full_ids, full_mask, prefix_dir)
    tol = allowed_diff("onnx_vs_numpy_reference", "fp32")
    s = ids.shape[1]
    assert np.abs(got[0] - want[:, :s])[mask > 0].max() <= tol
    for step, logits in enumerate(got[1:]):
        assert np.abs(logits - want[:, s + step]).max() <= tol, step
    return got[0], mask


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_in_checkpoint_matches_thudm_reference(base_ckpt, tmp_path, projection):
    ckpt = _with_prefix(base_ckpt, tmp_path / "ckpt", projection)
    bundle = _export(ckpt, tmp_path / "bundle")
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["spec"]["prefix_len"] == PRE_SEQ_LEN
    record = manifest["source"]["prefix"]
    assert record["pre_seq_len"] == PRE_SEQ_LEN and record["prefix_projection"] is projection
    # the fused graph cannot hold a fixed prefix: the bundle falls back to the portable graph and says why
    assert manifest["graphs"] == {} and "P-tuning" in manifest["extra"]["graphs_decided"]["fused"]
    assert not (tmp_path / "bundle" / "model.fused.onnx").exists()
    prefilled, mask = _compare_with_reference(bundle, str(ckpt))
    # the prefix matters: the same weights without it give other logits
    without = thudm_logits(str(base_ckpt), *left_padded_batch(701, (7, 4), seed=2))
    assert np.abs(prefilled - without)[mask > 0].max() > 0.1


def test_ptuning_output_dir_merges_with_prefix_option(base_ckpt, tmp_path):
    """THUDM's P-tuning scripts save only the prefix encoder (pytorch_model.bin + config.json with pre_seq_len)."""
    cfg = json.loads(open(os.path.join(base_ckpt, "config.json")).read())
    out_dir = tmp_path / "ptuning-output"
    out_dir.mkdir()
    (out_dir / "config.json").write_text(json.dumps(dict(cfg, pre_seq_len=PRE_SEQ_LEN, prefix_projection=True)))
    torch.save(_prefix_encoder(cfg, True, seed=6), str(out_dir / "pytorch_model.bin"))
    bundle = _export(base_ckpt, tmp_path / "bundle", "--prefix", str(out_dir))
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["source"]["prefix"]["source"] == str(out_dir)
    _compare_with_reference(bundle, base_ckpt, str(out_dir))


def test_pre_seq_len_without_prefix_encoder_is_refused(base_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, pre_seq_len=PRE_SEQ_LEN)))
    out = tmp_path / "out" / "bundle"
    result = CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "pre_seq_len" in lines[0] and "transformer.prefix_encoder.embedding.weight" in lines[0]
    assert "--prefix" in lines[0]
    assert not os.path.exists(out) and not os.path.exists(out.parent)
