"""The private parts of torch.onnx, onnxscript and onnx_ir that lossx.build.torch_onnx patches
still exist in the installed versions (pinned in pyproject.toml), and the patches take effect:
an upgrade that moves one fails here, not as a silent change in the exported graphs."""

import onnx_ir.passes.common
import onnxscript.rewriter
import torch

from lossx.build import torch_onnx


def test_onnxscript_rewrite_rules_hold_the_batch_norm_fusions():
    rules = onnxscript.rewriter._DEFAULT_REWRITE_RULES
    assert isinstance(rules, tuple)
    assert torch_onnx.batch_norm_fusions() and set(torch_onnx.batch_norm_fusions()) <= set(rules)


def test_weights_kept_by_name_drops_the_fusions_and_the_deduplication():
    with torch_onnx._weights_kept_by_name():
        rules = set(onnxscript.rewriter._DEFAULT_REWRITE_RULES)
        assert rules and not rules & set(torch_onnx.batch_norm_fusions())
        assert isinstance(
            onnx_ir.passes.common.DeduplicateInitializersPass(), torch_onnx._KeepInitializers
        )
    assert set(torch_onnx.batch_norm_fusions()) <= set(onnxscript.rewriter._DEFAULT_REWRITE_RULES)
    assert issubclass(onnx_ir.passes.common.DeduplicateInitializersPass, onnx_ir.passes.PassBase)


def test_torch_onnx_registry_builder_and_max_opset_exist():
    from torch.onnx._internal.exporter import _registration

    assert callable(_registration.ONNXRegistry.from_torchlib)
    assert isinstance(torch.onnx._constants.ONNX_MAX_OPSET, int)
    assert torch_onnx.max_opset() >= torch_onnx.EXPORTER_MIN_OPSET
