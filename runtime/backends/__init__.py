"""Execution backends behind one small protocol (see ``runtime.backends.base``)."""
