"""`apar-rt build`: engine folders (manifest, ONNX model, TensorRT engines) from checkpoints.

Submodules: manifest (the folder's record and its checks; light), builder (orchestration),
check (--check against the torch reference), tensorrt_builder (the only TensorRT importer
besides the TensorRT backend), commands (the click command).
"""
