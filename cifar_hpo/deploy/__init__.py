"""Shipping a final model: `export` (model.onnx, model.pt2, each loaded back and checked) and `predict` (loaders).

The ONNX path of `predict` runs in ONNX Runtime and never imports torch.
"""
