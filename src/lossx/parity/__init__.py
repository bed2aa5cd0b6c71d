"""Eager PyTorch against ONNX Runtime: the one part of lossx that needs both.

`compare` is numpy only (the build side's export self-check uses it too); `eager` needs torch.
"""
