"""ONNX export of one packed step, with `apar.TreePagedAttention` and its model-local function.

Import the submodules (`op`, `onnx_export`, `step_io`); this package imports nothing heavy.
"""
