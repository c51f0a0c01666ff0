"""The forms a checkpoint comes in, prepared for one export: plain, P-tuning v2, LoRA-merged, THUDM-quantized.

Where this stands in the flow: ``exporter.onnx_export.export_bundle`` calls :func:`prepare_forms` before it stages
anything, so every refusal (an adapter that does not fit, a P-tuning checkpoint without its prefix encoder, an
unsupported ``quantization_bit``, conflicting options) happens before any output exists. The result tells the
export which weight stream to build the model from, what to set on the model (the prefix), how to rewrite the graph
(kept quantization), which tolerance verifies it, and what the manifest records about each form.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from runtime.errors import ConfigError
from runtime.spec import ModelSpec

from exporter.config import CheckpointInfo, spec_from_checkpoint


@dataclass
class CheckpointForms:
    ckpt_dir: str
    spec: ModelSpec
    info: CheckpointInfo
    precision: str  # the traced precision: fp32 or fp16
    prefix_kv: Any = None  # (layers, 2, kv_heads, prefix_len, head_dim) float32, P-tuning v2
    prefix_record: Optional[Dict[str, Any]] = None
    adapters: List[Any] = field(default_factory=list)  # exporter.lora.Adapter
    claimed: List[str] = field(default_factory=list)  # checkpoint keys read by another stage than the loader
    reader: Optional[Callable] = None  # dequantizes THUDM quantized weights
    rewrite: Optional[Callable] = None  # keeps THUDM quantized weights as integers in the graph
    quantization_record: Optional[Dict[str, Any]] = None

    @property
    def verify_precision(self) -> str:
        """Kept integers dequantize to exactly the float weights the PyTorch model holds: fp32 tolerance."""
        return self.precision

    @property
    def bundle_precision(self) -> str:
        if self.rewrite is not None:
            return "int4" if self.info.quantization_bit == 4 else "int8"
        return self.precision

    def streaming_blocker(self) -> Optional[str]:
        """The form the streaming export (exporter.stream_export) cannot write yet, named for a message; None when
        it can. That export reads plain float weights tensor by tensor and its layer-streaming reference runs the
        ChatGLM2/3 / GLM-4 block, so every other form takes the whole-model flow (the one rule, applied by
        ``exporter.onnx_export.export_bundle``)."""
        from exporter.model_v1 import uses_v1_block

        if uses_v1_block(self.spec):
            return "a ChatGLM-6B (v1) checkpoint (v1 block, 2D positions)"
        if self.prefix_kv is not None:
            return "a P-tuning v2 prefix (pre_seq_len)"
        if self.adapters:
            return "a checkpoint with LoRA adapters (--lora)"
        if self.rewrite is not None:
            return "--keep-checkpoint-quantization"
        if self.reader is not None:
            return f"a THUDM int{self.info.quantization_bit} checkpoint (quantization_bit)"
        return None

    def weights(self, dtype, progress):
        """The canonical (name, tensor) stream: dequantized when needed, adapters merged."""
        from exporter.lora import merge_adapters
        from exporter.weights import load_canonical_weights

        stream = load_canonical_weights(self.ckpt_dir, self.spec, self.info.layout, dtype, progress,
                                        reader=self.reader, claimed=self.claimed)
        return merge_adapters(stream, self.spec, self.adapters) if self.adapters else stream

    def finish_model(self, model) -> None:
        if self.prefix_kv is not None:
            from exporter.model import set_prefix_kv

            set_prefix_kv(model, self.prefix_kv)

    def source_records(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.info.detection is not None:
            out["detection"] = self.info.detection.to_dict()
        if self.prefix_record is not None:
            out["prefix"] = self.prefix_record
        if self.adapters:
            out["lora"] = [a.record() for a in self.adapters]
        if self.quantization_record is not None:
            out["checkpoint_quantization"] = self.quantization_record
        return out


def prepare_forms(ckpt_dir: str, rope_scaling: Optional[str] = None, generation: Optional[str] = None,
                  prefix_dir: Optional[str] = None, lora: Sequence[str] = (), lora_scale: float = 1.0,
                  keep_checkpoint_quantization: bool = False, precision: str = "fp32") -> CheckpointForms:
    """Read and check everything about the checkpoint's form; no output is written here."""
    from exporter import prefix as ptuning
    from exporter import thudm_quant
    from exporter.weights import canonical_shapes, find_weight_files

    prefix_config = ptuning.read_prefix_config(prefix_dir) if prefix_dir else None
    spec, info = spec_from_checkpoint(ckpt_dir, rope_scaling=rope_scaling, generation=generation,
                                      prefix_config=prefix_config)
    forms = CheckpointForms(ckpt_dir, spec, info, precision)
    keys = list(find_weight_files(ckpt_dir).key_to_file)
    forms.claimed += ptuning.claimed_prefix_keys(keys)  # a P-tuning checkpoint's encoder is read below, or unused

    if spec.prefix_len:
        forms.prefix_kv = ptuning.prefix_kv_from_checkpoint(ckpt_dir, spec, info.prefix_projection, prefix_dir)
        forms.prefix_record = ptuning.prefix_record(forms.prefix_kv, info.prefix_projection, prefix_dir)
    elif prefix_dir:
        raise ConfigError(f"--prefix {prefix_dir}: pre_seq_len is not set")

    bits = info.quantization_bit
    if keep_checkpoint_quantization:
        if not bits:
            raise ConfigError(f"--keep-checkpoint-quantization: {ckpt_dir} is not a quantized checkpoint "
                              "(config.json quantization_bit is 0 or absent)")
        if precision != "fp32":
            other = "--fp16" if precision == "fp16" else f"--precision {precision}"
            raise ConfigError("--keep-checkpoint-quantization keeps the checkpoint's integers with float32 "
                              f"activations; it cannot be combined with {other}")
        if lora:
            raise ConfigError("--keep-checkpoint-quantization cannot be combined with --lora (merged weights are no "
                              "longer the checkpoint's integers); drop one of them")
    if bits:
        forms.reader = thudm_quant.dequantizing_reader(spec, bits)
        forms.claimed += thudm_quant.scale_keys(spec)
        forms.quantization_record = {"quantization_bit": bits, "kept": keep_checkpoint_quantization,
                                     "dequantized": "q * weight_scale per output row"}
        if keep_checkpoint_quantization:
            quantized = thudm_quant.read_quantized(ckpt_dir, spec, bits)
            forms.rewrite, record = thudm_quant.keep_quantization_rewrite(quantized, bits)
            forms.quantization_record.update(record)

    if lora:
        from exporter.lora import check_adapters, read_adapters

        forms.adapters = read_adapters(lora, lora_scale)
        check_adapters(spec, canonical_shapes(spec), forms.adapters)
    return forms
