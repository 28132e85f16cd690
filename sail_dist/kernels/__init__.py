"""Every hot op the model needs, per implementation, behind one seam (the OpSet)."""
from sail_dist.kernels.opset import OpSet, available_opsets, get_opset, opset_for_backend, register_opset

__all__ = ["OpSet", "available_opsets", "get_opset", "opset_for_backend", "register_opset"]
