"""LoRA adapters merged at export: the hf-layout export equals transformers + peft's merge_and_unload within the
tolerance table's transformers row, the THUDM layout with the same adapter converted to THUDM module names gives
the same logits, and an adapter that does not fit the base is refused naming the module."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from exporter.cli import main
from onnx_steps import OnnxStepper, left_padded_batch, reference_logits
from reference import transformers_model
from runtime.tolerances import allowed_diff

SHAPE = dict(head_dim=32, vocab_size=1009)  # the twins of tests/exporter/test_export_parity.py (shared fixtures)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
THUDM_NAME = {"o_proj": "self_attention.dense", "gate_up_proj": "mlp.dense_h_to_4h",
              "down_proj": "mlp.dense_4h_to_h"}


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory):
    """A PEFT adapter trained-looking (random A and B) on the hf twin, and peft's merged model."""
    from peft import LoraConfig, get_peft_model

    hf = tiny_models.checkpoint("same-hf", "glm4", "hf", seed=7, **SHAPE)
    torch.manual_seed(0)
    model = get_peft_model(transformers_model(hf), LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS,
                                                              init_lora_weights=False))
    with torch.no_grad():  # PEFT's random init, B doubled: logits move by ~20. (With B x8 the export's own fp32
        # check of ONNX vs PyTorch on these same merged weights failed, 4.3e-4 > 2.9e-4: unrealistically large deltas.)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(2.0)
    path = str(tmp_path_factory.mktemp("lora") / "adapter")
    model.save_pretrained(path)
    return hf, path, model.merge_and_unload().eval()


def _export(tmp_path, ckpt, *extra, name="bundle"):
    out = tmp_path / name
    result = CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet", *extra])
    return result, out


def test_hf_layout_merge_equals_peft(adapter, tiny_models, tmp_path):
    hf, path, merged = adapter
    result, out = _export(tmp_path, hf, "--lora", path)
    assert result.exit_code == 0, result.output
    stepper = OnnxStepper(str(out))
    ids, mask = left_padded_batch(1009, (7, 4), seed=3)
    tokens = np.array([[5, 9], [17, 3], [40, 41]])
    got = [stepper.start(ids, mask)] + [stepper.step(t) for t in tokens]
    want = reference_logits(merged, np.concatenate([ids, tokens.T], 1),
                            np.concatenate([mask, np.ones_like(tokens.T)], 1))
    tol = allowed_diff("onnx_vs_transformers", "fp32")
    s = ids.shape[1]
    assert np.abs(got[0] - want[:, :s])[mask > 0].max() <= tol
    for i, logits in enumerate(got[1:]):
        assert np.abs(logits - want[:, s + i]).max() <= tol
    base = OnnxStepper(tiny_models.bundle("same-hf", hf)).start(ids, mask)
    assert np.abs(base - got[0])[mask > 0].max() > 0.1  # the adapter changed the model
    record = json.loads((out / "manifest.json").read_text())["source"]["lora"]
    assert len(record) == 1 and record[0]["r"] == 4 and record[0]["scale"] == 2.0
    assert record[0]["modules_merged"] == 6 * 2
    assert len(record[0]["files"]["adapter_model.safetensors"]["sha256"]) == 64


def _thudm_adapter(hf_adapter, out):
    """The same adapter under THUDM module names: q/k/v become one query_key_value adapter of rank 3r (A stacked,
    B block-diagonal, alpha tripled so alpha / r stays); the other modules are zero-padded to rank 3r."""
    from safetensors.torch import load_file

    cfg = json.load(open(os.path.join(hf_adapter, "adapter_config.json")))
    r = cfg["r"]
    src = load_file(os.path.join(hf_adapter, "adapter_model.safetensors"))
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in src})
    dst = {}
    for i in layers:
        hf = f"base_model.model.model.layers.{i}."
        th = f"base_model.model.transformer.encoder.layers.{i}."
        a = [src[f"{hf}self_attn.{p}.lora_A.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        b = [src[f"{hf}self_attn.{p}.lora_B.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        dst[th + "self_attention.query_key_value.lora_A.weight"] = torch.cat(a, 0)
        dst[th + "self_attention.query_key_value.lora_B.weight"] = torch.block_diag(*b)
        for hf_name, th_name in THUDM_NAME.items():
            module = "self_attn." + hf_name if hf_name == "o_proj" else "mlp." + hf_name
            a1, b1 = src[f"{hf}{module}.lora_A.weight"], src[f"{hf}{module}.lora_B.weight"]
            dst[f"{th}{th_name}.lora_A.weight"] = torch.cat([a1, torch.zeros(2 * r, a1.shape[1])], 0)
            dst[f"{th}{th_name}.lora_B.weight"] = torch.cat([b1, torch.zeros(b1.shape[0], 2 * r)], 1)
    os.makedirs(out)
    cfg.update(r=3 * r, lora_alpha=3 * cfg["lora_alpha"],
               target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    json.dump(cfg, open(os.path.join(out, "adapter_config.json"), "w"))
    torch.save(dst, os.path.join(out, "adapter_model.bin"))  # the .bin form PEFT wrote before safetensors
    return out


def test_thudm_layout_matches_the_converted_adapter(adapter, tiny_models, tmp_path):
    hf, path, _ = adapter
    thudm = tiny_models.checkpoint("same-thudm", "glm4", "thudm", seed=7, **SHAPE)
    converted = _thudm_adapter(path, str(tmp_path / "thudm-adapter"))
    r1, out_hf = _export(tmp_path, hf, "--lora", path, "--lora-scale", "0.5", name="hf")
    r2, out_th = _export(tmp_path, thudm, "--lora", converted, "--lora-scale", "0.5", name="thudm")
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
    ids, mask = left_padded_batch(1009, (8, 4), seed=5)
    a, b = OnnxStepper(str(out_hf)), OnnxStepper(str(out_th))
    tol = allowed_diff("layout_vs_layout", "fp32")
    assert np.abs(a.start(ids, mask) - b.start(ids, mask))[mask > 0].max() <= tol
    tok = np.array([3, 4])
    assert np.abs(a.step(tok) - b.step(tok)).max() <= tol


def _assert_refused(result, out, *needles):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not os.path.exists(out)


def test_adapter_for_another_model_is_refused(adapter, tiny_models, tmp_path):
    """The hf adapter (hidden 128, 2 layers) on a base of other sizes: refused naming the module and shapes."""
    _, path, _ = adapter
    other = tiny_models.case("glm4-hf")[0]  # head_dim 64, 2 heads: other q/k/v shapes
    result, out = _export(tmp_path, other, "--lora", path)
    _assert_refused(result, out, "layers.0.self_attn", "lora_A", "another model")


def test_adapter_with_foreign_modules_is_refused(adapter, tiny_models, tmp_path):
    from safetensors.torch import save_file

    hf, path, _ = adapter
    bad = tmp_path / "gpt2-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                         "target_modules": ["c_attn"]}))
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 128),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(384, 4)},
              str(bad / "adapter_model.safetensors"))
    result, out = _export(tmp_path, hf, "--lora", str(bad))
    _assert_refused(result, out, "c_attn", "not a LoRA A/B weight of a ChatGLM layer")



def test_several_adapters_merge_in_order_like_peft(adapter, tmp_path):
    """--lora A --lora B equals peft merging both adapters (A then B) into the base."""
    from peft import LoraConfig, PeftModel, get_peft_model

    hf, path_a, _ = adapter
    torch.manual_seed(1)
    second = get_peft_model(transformers_model(hf), LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"],
                                                               init_lora_weights=False))
    with torch.no_grad():
        for name, p in second.named_parameters():
            if "lora_B" in name:
                p.mul_(2.0)
    path_b = str(tmp_path / "adapter-b")
    second.save_pretrained(path_b)
    both = PeftModel.from_pretrained(transformers_model(hf), path_a)
    both.load_adapter(path_b, adapter_name="b")
    merged = both.merge_and_unload(adapter_names=["default", "b"]).eval()
    result, out = _export(tmp_path, hf, "--lora", path_a, "--lora", path_b)
    assert result.exit_code == 0, result.output
    ids, mask = left_padded_batch(1009, (6, 3), seed=8)
    got = OnnxStepper(str(out)).start(ids, mask)
    want = reference_logits(merged, ids, mask)
    assert np.abs(got - want)[mask > 0].max() <= allowed_diff("onnx_vs_transformers", "fp32")
    record = json.loads((out / "manifest.json").read_text())["source"]["lora"]
    assert [r["r"] for r in record] == [4, 2] and record[1]["modules_merged"] == 2 * 2


def test_direct_quantized_export_with_an_adapter_is_refused(adapter, tmp_path):
    """The streaming export does not merge adapters: --lora with --precision int8-dynamic names the two steps."""
    hf, path, _ = adapter
    result, out = _export(tmp_path, hf, "--lora", path, "--precision", "int8-dynamic")
    _assert_refused(result, out, "LoRA adapters", "--precision fp32", "glm-export quantize --precision int8-dynamic")
