"""Eager PyTorch against ONNX Runtime for a whole artifact: `lossx check` and `lossx eval
--compare-eager`, the one part of lossx that needs both sides. The comparison itself is
lossx.compare's, torch-free; the eager runner is lossx.build's.
"""
