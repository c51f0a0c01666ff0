"""optimum loads every generation's bundle (``ORTModelForCausalLM.from_pretrained(bundle)``) and generates our greedy
ids, single and left-padded batch. optimum pins transformers 4.57, so it runs in its own environment: ``make
test-optimum`` builds it (.venv-optimum) and runs this module with GLM_EXPORT_OPTIMUM_PYTHON pointing at it."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from runtime import GenerationConfig, GlmModel

OPTIMUM_PYTHON = os.environ.get("GLM_EXPORT_OPTIMUM_PYTHON")
pytestmark = pytest.mark.skipif(not OPTIMUM_PYTHON, reason="optimum runs in its own venv: make test-optimum")

CASES = ["chatglm3-thudm-hd32", "glm4-thudm", "glm4-hf", "glm4_0414-hf", "chatglm2_32k-thudm-interp"]


def test_optimum_generates_our_greedy_ids(tiny_models, tmp_path):
    bundles = [tiny_models.case(c)[1] for c in CASES]
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"bundles": bundles, "prompts": prompts, "new_tokens": 12}))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([OPTIMUM_PYTHON, os.path.join(here, "optimum_greedy.py"), str(job)], check=True,
                         capture_output=True, text=True)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    for bundle in bundles:
        with GlmModel.load(bundle, threads=1) as model:
            ours = [r.generated_ids for r in model.generate(prompts, GenerationConfig(max_new_tokens=12,
                                                                                     eos_token_ids=()))]
        assert theirs[bundle] == ours, bundle
