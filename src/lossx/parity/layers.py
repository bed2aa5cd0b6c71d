"""Layer by layer: each leaf module's eager output against the ONNX value it became.

torch.onnx (dynamo) records each node's module path in the node's metadata
(`pkg.torch.onnx.name_scopes`, e.g. ['', 'model1', 'model1.3', 'max_pool2d_1']). The last node
of a module produces its output; lossx exposes those values as extra graph outputs, runs the
graph once, and compares each with the module's output captured by a forward hook.
"""

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from lossx.compare.elementwise import element_errors
from lossx.compare.report import LayerRow
from lossx.compare.tolerances import Tolerance
from lossx.runtime.artifact import Artifact
from lossx.runtime.session import open_session

_SCOPES = "pkg.torch.onnx.name_scopes"


def module_outputs(proto: onnx.ModelProto) -> dict[str, str]:
    """Module path -> the ONNX value its last node produces."""
    found = {}
    for node in proto.graph.node:
        for prop in node.metadata_props:
            if prop.key == _SCOPES:
                scopes = json.loads(prop.value.replace("'", '"'))
                if len(scopes) >= 2 and node.output:
                    found[scopes[-2]] = node.output[0]
    return found


def layer_diagnosis(
    artifact: Artifact,
    model: nn.Module,
    images: np.ndarray,
    tolerance: Tolerance,
    provider: str = "cpu",
) -> list[LayerRow]:
    """For every leaf module of `model`, in execution order, how far the ONNX model's value for
    it is from the eager output on `images`."""
    proto = onnx.load(artifact.path / artifact.graph("model").spec.file)
    values = module_outputs(proto)
    leaves = {
        name: module
        for name, module in model.named_modules()
        if name and not list(module.children()) and name in values
    }
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach())
        )
        for name, module in leaves.items()
    ]
    try:
        with torch.no_grad():
            model(torch.from_numpy(images))
    finally:
        for hook in hooks:
            hook.remove()
    existing = {o.name for o in proto.graph.output}
    for name in captured:
        if values[name] not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(values[name]))
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "model_layers.onnx"
        onnx.save_model(proto, probe)
        session = open_session(probe, provider)
    names = [values[name] for name in captured]
    onnx_values = dict(zip(names, session.run(names, {"images": images}), strict=True))
    rows = []
    for name, eager in captured.items():  # hooks fire in execution order
        errors = element_errors(
            onnx_values[values[name]], eager.numpy(), tolerance.atol, tolerance.rtol
        )
        rows.append(
            LayerRow(
                f"{name} ({type(leaves[name]).__name__})",
                values[name],
                float(errors.error.max(initial=0.0)),
                float(errors.used.max(initial=0.0)),
            )
        )
    return rows
