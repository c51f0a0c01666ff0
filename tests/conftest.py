"""Shared fixtures: tiny checkpoints and their exported bundles, built once per test session."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the trained fixture, registered here once so that its session-scoped build is shared by every module using it
from trained_fixture import trained  # noqa: E402,F401  (pytest fixture)

# (generation, layout, shape overrides, config overrides): every case the parity tests cover
CASES = {
    "chatglm3-thudm-hd32": ("chatglm3", "thudm", dict(head_dim=32, vocab_size=1001), {}),
    "chatglm3_32k-thudm-hd64": ("chatglm3-32k", "thudm", dict(hidden_size=128, num_heads=2, head_dim=64), {}),
    "chatglm2_32k-thudm-interp": ("chatglm2", "thudm", dict(num_kv_heads=1), {"rope_ratio": 16}),
    "glm4-thudm": ("glm4", "thudm", dict(num_heads=4, num_kv_heads=2, head_dim=32), {}),
    "glm4-hf": ("glm4", "hf", dict(head_dim=64, num_heads=2, num_kv_heads=2), {}),
    "glm4_0414-hf": ("glm4-0414", "hf", dict(num_layers=3), {}),
}


class _Cache:
    """Checkpoints and bundles keyed by what they are built from, not by the name a test gives them: tests asking
    for the same checkpoint (the default chatglm3 one, say) share one build. The name only names the directory of
    the first build. Tests must not modify what they get (copy it first)."""

    def __init__(self, root):
        self.root = root
        self.made = {}

    def checkpoint(self, name, generation, layout, seed=0, weight_format="safetensors", config_overrides=None,
                   **shape):
        from exporter.tiny.checkpoint import write_tiny_checkpoint

        key = ("ckpt", generation, layout, seed, weight_format, _frozen(config_overrides), _frozen(shape))
        if key not in self.made:
            path = os.path.join(self.root, "ckpt-" + name)
            write_tiny_checkpoint(path, generation=generation, layout=layout, seed=seed,
                                  weight_format=weight_format, config_overrides=config_overrides, **shape)
            self.made[key] = path
        return self.made[key]

    def bundle(self, name, ckpt, **kwargs):
        from exporter.onnx_export import export_bundle

        # keyed with export_bundle's defaults filled in: precision="fp32" given or not is the same bundle
        import inspect

        bound = inspect.signature(export_bundle).bind(ckpt, "", **kwargs)
        bound.apply_defaults()
        options = {k: v for k, v in bound.arguments.items() if k not in ("ckpt_dir", "out_dir")}
        key = ("bundle", ckpt, _frozen(options))
        if key not in self.made:
            path = os.path.join(self.root, "bundle-" + name)
            export_bundle(ckpt, path, **kwargs)
            self.made[key] = path
        return self.made[key]

    def case(self, case_name):
        gen, layout, shape, overrides = CASES[case_name]
        ckpt = self.checkpoint(case_name, gen, layout, config_overrides=overrides, **shape)
        return ckpt, self.bundle(case_name, ckpt)


def _frozen(mapping):
    return tuple(sorted((mapping or {}).items()))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return _Cache(str(tmp_path_factory.mktemp("tiny-models")))


# ChatGLM-6B (v1): 3 layers (layer-scaling coefficients 1..3, alpha sqrt(6)), 4 heads of 32, ice_text tokenizer
V1_SHAPE = dict(num_layers=3)


@pytest.fixture(scope="session")
def chatglm1_model(tiny_models):
    """(checkpoint dir, fp32 bundle dir) of the tiny ChatGLM-6B as published (lm_head tied to the embedding)."""
    ckpt = tiny_models.checkpoint("chatglm1", "chatglm1", "thudm", **V1_SHAPE)
    return ckpt, tiny_models.bundle("chatglm1", ckpt)


@pytest.fixture(scope="session")
def chatglm1_untied(tiny_models):
    """The same with its own random lm_head (tie_word_embeddings: false, which THUDM's code honours): with random
    weights a tied head mostly predicts the input token again, so greedy runs need this one to mean something."""
    ckpt = tiny_models.checkpoint("chatglm1-untied", "chatglm1", "thudm",
                                  config_overrides={"tie_word_embeddings": False}, **V1_SHAPE)
    return ckpt, tiny_models.bundle("chatglm1-untied", ckpt)
