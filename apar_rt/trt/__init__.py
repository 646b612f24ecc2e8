"""TensorRT at apar-rt's edge: which library (library.py) and the attention plugin (plugin.py).

Nothing else in apar-rt imports `tensorrt` or `tensorrt_rtx`; the builder and the backend go
through `apar_rt.trt.library.load()`.
"""
