"""Greedy ids of a bundle through onnxruntime-genai's own loop (``og.Model(bundle)``), for the interop tests."""
import numpy as np


def genai_greedy(og, bundle, prompt, new_tokens):
    """The ``new_tokens`` greedy ids onnxruntime-genai (the module ``og``) generates after ``prompt`` on the CPU."""
    config = og.Config(bundle)
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens,
                              do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompt, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(prompt):]
