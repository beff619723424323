"""Front ends: a model from elsewhere -> rnnengine's graph IR.

converter.py reads ONNX (opsets.py checks each node against the ONNX schema, fuse.py folds
cells written op by op into engine cells); torch_import.py reads a live PyTorch module.
"""
