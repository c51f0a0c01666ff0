"""A Triton Inference Server model repository for a bundle: the Python backend, decoupled, wrapping our scheduler.

    repository.py   writes REPO/NAME/config.pbtxt, REPO/NAME/1/model.py and REPO/NAME/1/bundle/
    model.py        TritonPythonModel: Triton's Python backend calls initialize / execute / finalize
"""
