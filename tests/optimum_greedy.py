"""Run under optimum's own environment (make test-optimum): greedy ids of glm-export bundles through
``optimum.onnxruntime.ORTModelForCausalLM``. Reads a JSON job from argv[1], prints one JSON line of results.

job: {"bundles": [dir, ...], "prompts": [[ids], ...] (left-padded together), "new_tokens": n}
"""
import json
import sys

import numpy as np
import torch
from optimum.onnxruntime import ORTModelForCausalLM


def main():
    job = json.loads(open(sys.argv[1]).read())
    out = {}
    for bundle in job["bundles"]:
        model = ORTModelForCausalLM.from_pretrained(bundle, use_cache=True, use_io_binding=False)
        prompts = job["prompts"]
        n = max(len(p) for p in prompts)
        pad = model.config.pad_token_id or 0
        ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=job["new_tokens"], do_sample=False,
                             eos_token_id=None, pad_token_id=pad, min_new_tokens=job["new_tokens"])
        out[bundle] = np.asarray(gen[:, n:]).tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
