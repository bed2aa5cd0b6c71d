"""The graphs of one export, each exported once, written with its metadata, checked by
onnx.checker and verified against eager PyTorch."""

from collections.abc import Sequence
from pathlib import Path

import onnx
from torch import nn

import lossx
from lossx.build.graph_modules import MODULES, exported_module
from lossx.build.preflight import DEFAULT_OPSET
from lossx.build.self_check import verify_graph
from lossx.build.surgery import fused_proto
from lossx.build.torch_onnx import exported_proto, exported_together
from lossx.errors import ExportError, first_line
from lossx.runtime.contract import ImageContract
from lossx.runtime.graphs import GraphSpec, loss_graph, model_part


class Graphs:
    """The graphs of one export, each exported once: the loss graphs `together` in one
    torch.onnx.export call, the others alone, fused graphs composed from the model and loss
    graphs. Graphs that run the model are verified on images of `contract`."""

    def __init__(
        self,
        model: nn.Module,
        opset: int,
        together: Sequence[GraphSpec] = (),
        contract: ImageContract | None = None,
    ) -> None:
        self.model, self.opset, self.together = model, opset, list(together)
        self.contract = contract
        self.exported: dict[GraphSpec, onnx.ModelProto] = {}

    def proto(self, spec: GraphSpec) -> onnx.ModelProto:
        """Graph `spec`, exported, composed or built."""
        if MODULES[spec.kind].built:
            return MODULES[spec.kind].built(spec, self.opset)
        if MODULES[spec.kind].composed:
            model, loss = self.proto(model_part(spec)), self.proto(loss_graph(spec.loss))
            return fused_proto(spec, model, loss)
        if spec in self.together:
            self.exported.update(exported_together(self.together, self.model, self.opset))
            self.together = []
        if spec not in self.exported:
            module = exported_module(spec, self.model)
            self.exported[spec] = exported_proto(spec, module, self.opset)
        return self.exported[spec]


def write_graph(
    proto: onnx.ModelProto, spec: GraphSpec, path: Path, metadata: dict[str, str]
) -> onnx.ModelProto:
    """Write graph `proto` to `path` with lossx's producer and `metadata` (on a copy: the
    exported graphs stay as they are, to be composed), then check the file with onnx.checker."""
    written = onnx.ModelProto()
    written.CopyFrom(proto)
    written.producer_name = "lossx"
    written.producer_version = lossx.__version__
    for key, value in metadata.items():
        written.metadata_props.add(key=key, value=value)
    onnx.save_model(written, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{spec.file}: onnx.checker rejected it: {first_line(e)}") from None
    return written


def export_graph(
    spec: GraphSpec,
    model: nn.Module,
    path: Path,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Export graph `spec` (of `model` for model, fused and training graphs; a fused graph is
    composed from the model and loss graphs) to `path`, checked with onnx.checker and verified
    in ONNX Runtime against the torch.nn reference."""
    return export_verified(spec, model, path, metadata or {}, Graphs(model, opset))


def export_verified(
    spec: GraphSpec, model: nn.Module, path: Path, metadata: dict[str, str], graphs: Graphs
) -> onnx.ModelProto:
    proto = write_graph(graphs.proto(spec), spec, path, metadata)
    verify_graph(spec, model, path, graphs.contract)
    return proto
