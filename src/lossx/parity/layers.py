"""Where a failing model graph goes wrong: layer by layer, each leaf module's eager output
against the ONNX value it became, and node by node, each op of the eager model against the
ONNX value torch.onnx made of it.

torch.onnx (dynamo) records each node's module path in the node's metadata
(`pkg.torch.onnx.name_scopes`, e.g. ['', 'model1', 'model1.3', 'max_pool2d_1'], the last entry
the fx node it came from) and its aten op (`pkg.torch.onnx.class_hierarchy`). lossx exposes
the values as extra graph outputs, runs the graph once, and compares each with the eager value:
a module's output captured by a forward hook, or an op's output from torch.export's graph of
the eager model run by an fx Interpreter.
"""

import contextlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from lossx.build.models import user_code_in_traceback
from lossx.compare.elementwise import element_errors
from lossx.compare.report import LayerRow
from lossx.compare.tolerances import Tolerance
from lossx.runtime.artifact import Artifact
from lossx.runtime.options import SessionOptions
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
    onnx_values = _run_values(proto, [values[name] for name in captured], images, provider)
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


_HIERARCHY = "pkg.torch.onnx.class_hierarchy"


def first_failing_node(
    artifact: Artifact,
    model: nn.Module,
    images: np.ndarray,
    tolerance: Tolerance,
    provider: str = "cpu",
) -> str | None:
    """The first op of the model, in the eager model's order, whose ONNX value is out of
    `tolerance` on `images`: its module path, aten op and line of code, e.g. `blocks.1
    (BasicBlock): aten.add.Tensor at models.py:37 `return F.relu(out + shortcut)``. Finer than
    `layer_diagnosis`, which sees modules only: a residual addition or an activation called in
    a forward is a node here. Ops are matched by module path, op and their order within that
    module, so an eager model whose code changed still lines up up to the change. None where
    no op matches or the eager model cannot be traced by torch.export."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model.eval(), (torch.from_numpy(images),))
    except Exception:  # the eager model need not be exportable for its modules to be compared
        return None
    eager = _eager_values(program, images)
    proto = onnx.load(artifact.path / artifact.graph("model").spec.file)
    onnx_names = _onnx_values(proto)
    matched = [(key, node) for key, node in eager if key in onnx_names]
    if not matched:
        return None
    got = _run_values(proto, [onnx_names[key] for key, _ in matched], images, provider)
    for key, (value, stack) in matched:
        onnx_value = got[onnx_names[key]]
        if onnx_value.shape != value.shape:
            return _described(key, stack)
        errors = element_errors(onnx_value, value, tolerance.atol, tolerance.rtol)
        if errors.failed.any():
            return _described(key, stack)
    return None


def _run_values(
    proto: onnx.ModelProto, names: list[str], images: np.ndarray, provider: str
) -> dict[str, np.ndarray]:
    """Values `names` of model graph `proto` for `images`: exposed as extra graph outputs (on
    `proto`, a copy the caller owns) and run once in ONNX Runtime."""
    existing = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(names):
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "model_values.onnx"
        onnx.save_model(proto, probe)
        session = open_session(probe, SessionOptions(provider))
    initializers = {t.name for t in proto.graph.initializer}
    (images_name,) = [i.name for i in proto.graph.input if i.name not in initializers]
    feed = {images_name: images}
    return dict(zip(names, session.run(names, feed), strict=True))


def _eager_values(program, images: np.ndarray) -> list[tuple[tuple, tuple]]:
    """Every op of an exported program, run eagerly: ((module path, op, index of that op in
    that module), (its tensor value, its stack trace)), in execution order."""
    values: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                values[node.name] = result.detach()
            return result

    module = program.module()
    with torch.no_grad():
        Recorder(module).run(torch.from_numpy(images))
    found, counts = [], {}
    for node in program.graph.nodes:
        if node.op != "call_function" or node.name not in values:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path, cls = list(stack.values())[-1] if stack else ("", type(module).__name__)
        op = str(node.target)
        index = counts[(path, op)] = counts.get((path, op), -1) + 1
        value = values[node.name].numpy()
        found.append(((path, op, index), (value, (cls, node.meta.get("stack_trace") or ""))))
    return found


def _onnx_values(proto: onnx.ModelProto) -> dict[tuple, str]:
    """(module path, op, index of that op in that module) -> the ONNX value torch.onnx made of
    that op: named as its fx node, or, where export renamed it (the graph's output), the output
    of the last ONNX node the op became."""
    ops: dict[str, tuple[str, str, str]] = {}  # fx node name -> (path, op, ONNX value)
    produced = {name for node in proto.graph.node for name in node.output}
    for node in proto.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if _SCOPES not in props or _HIERARCHY not in props or not node.output:
            continue
        scopes = json.loads(props[_SCOPES].replace("'", '"'))
        fx_name, path = scopes[-1], (scopes[-2] if len(scopes) >= 2 else "")
        op = json.loads(props[_HIERARCHY].replace("'", '"'))[-1]
        value = fx_name if fx_name in produced else node.output[0]
        ops[fx_name] = (path, op, value)  # the last node of an op that became several wins
    found, counts = {}, {}
    for path, op, value in ops.values():
        index = counts[(path, op)] = counts.get((path, op), -1) + 1
        found[(path, op, index)] = value
    return found


def _described(key: tuple, stack: tuple) -> str:
    (path, op, _), (cls, trace) = key, stack
    where = user_code_in_traceback(trace) if trace else None
    module = f"{path} ({cls.rsplit('.', 1)[-1]})" if path else f"the model ({cls})"
    return f"{module}: {op}" + (f" at {where}" if where else "")
