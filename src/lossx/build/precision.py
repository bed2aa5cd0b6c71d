"""Lower-precision graphs: int8 by ONNX Runtime's static quantizer, fp16 by onnxconverter-common.

Both are maintained converters; lossx only chooses their settings (measured in docs/precision.md)
and converts model.onnx alone; a fused graph gets that converted model spliced in place of its
model part, its loss part (what follows `logits`) kept fp32, as are the standalone loss graphs.
"""

import contextlib
import importlib.metadata
import io
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime

from lossx.build.calibration import Calibration
from lossx.errors import ArtifactError, ExportError, SpecError, first_line
from lossx.runtime.graphs import GraphSpec, Role
from lossx.runtime.precisions import PRECISIONS

CALIBRATION_BATCH = 64

# U8S8 QDQ (uint8 activations, int8 per-channel weights) with 7-bit weights (reduce_range):
# without VNNI, ONNX Runtime's U8S8 kernels sum pairs of products in 16 bits, which full 8-bit
# weights can saturate; 7-bit weights cannot. On a VNNI CPU reduce_range cost 0.8 points of
# argmax agreement with fp32 on the test images and ran faster, so one setting serves every CPU
# an artifact may meet.
INT8_SETTINGS = {
    "format": "QDQ",
    "activations": "uint8",
    "weights": "int8",
    "per_channel": True,
    "reduce_range": True,
}


def loss_part(graph: onnx.GraphProto, logits: str) -> list[onnx.NodeProto]:
    """The nodes of fused graph `graph` that its `logits` output does not depend on."""
    producer = {out: index for index, node in enumerate(graph.node) for out in node.output}
    model, stack = set(), [logits]
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in model:
            model.add(index)
            stack.extend(graph.node[index].input)
    return [node for index, node in enumerate(graph.node) if index not in model]


def lower_model(
    path: Path, spec: GraphSpec, precision: str, calibration: Calibration | None
) -> None:
    """Rewrite model graph file `path` (fp32) at `precision`; ExportError (one line) when a
    converter fails or ONNX Runtime cannot load what it wrote."""
    try:
        with _quiet():
            CONVERTERS[precision].convert(path, calibration)
    except (SpecError, ExportError, ArtifactError):
        raise
    except Exception as e:
        raise ExportError(
            f"{spec.file}: the {precision} conversion failed: {first_line(e)}"
        ) from None
    check_loads(path, spec, precision)


def splice_model(fused_path: Path, model_path: Path, spec: GraphSpec, precision: str) -> None:
    """Rewrite fused graph file `fused_path` (fp32) with model graph `model_path` (converted)
    in place of its model part: the loss part, everything downstream of `logits`, stays fp32
    and the model part is exactly model.onnx."""
    fused, model = onnx.load(fused_path), onnx.load(model_path)
    graph = fused.graph
    loss_nodes = loss_part(graph, spec.named(Role.LOGITS))
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in loss_nodes for a in node.attribute):  # fmt: skip
        raise ExportError(f"{spec.file}: its loss holds subgraphs, which lossx cannot splice")
    logits = spec.named(Role.LOGITS)
    fixed = {logits, *(t.name for t in graph.input), *(t.name for t in graph.output)}

    def renamed(name: str) -> str:
        return name if not name or name in fixed else f"loss.{name}"

    used = {name for node in loss_nodes for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used]
    for node in loss_nodes:
        node.name = renamed(node.name)
        node.input[:] = [renamed(n) for n in node.input]
        node.output[:] = [renamed(n) for n in node.output]
    for tensor in initializers:
        tensor.name = renamed(tensor.name)
    spliced = onnx.helper.make_graph(
        [*model.graph.node, *loss_nodes],
        graph.name,
        list(graph.input),
        list(graph.output),
        [*model.graph.initializer, *initializers],
        value_info=list(model.graph.value_info),
    )
    for image_input in model.graph.input:
        if image_input.name not in {t.name for t in graph.input}:
            raise ExportError(f"{spec.file}: the model's input {image_input.name} is not its own")
    result = onnx.helper.make_model(
        spliced,
        opset_imports=list(model.opset_import),
        ir_version=max(model.ir_version, fused.ir_version),
        producer_name=fused.producer_name,
        producer_version=fused.producer_version,
    )
    result.metadata_props.extend(fused.metadata_props)
    result.functions.extend([*model.functions, *fused.functions])
    try:
        onnx.checker.check_model(result, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(
            f"{spec.file}: the spliced {precision} graph is invalid: {first_line(e)}"
        ) from None
    onnx.save(result, fused_path)
    check_loads(fused_path, spec, precision)


def check_loads(path: Path, spec: GraphSpec, precision: str) -> None:
    """ArtifactError unless ONNX Runtime loads `path` (its own check of what a converter
    wrote)."""
    try:
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ArtifactError(
            f"{spec.file}: ONNX Runtime cannot load the {precision} graph: {first_line(e)}"
        ) from None


def _quantize(path: Path, calibration: Calibration) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            images = onnx.load(path, load_external_data=False).graph.input[0].name
            self.batches = iter({images: x} for x in calibration.model_inputs(CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="lossx-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(path), str(prepared))
        quantize_static(
            str(prepared),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=INT8_SETTINGS["per_channel"],
            reduce_range=INT8_SETTINGS["reduce_range"],
            calibrate_method=methods[calibration.method],
        )


def _to_fp16(path: Path, calibration: None = None) -> None:
    from onnxconverter_common import float16

    converted = float16.convert_float_to_float16(onnx.load(path), keep_io_types=True)
    onnx.save(converted, path)


@contextlib.contextmanager
def _quiet():
    """The converters print progress and warnings; lossx reports itself."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX512-VNNI or AVX-VNNI): ONNX Runtime's fast int8 path."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _int8_record(calibration: Calibration) -> dict:
    return {
        "converter": f"onnxruntime.quantization {onnxruntime.__version__} (quantize_static)",
        **INT8_SETTINGS,
        "calibration": calibration.record(),
        "exported_on_vnni_cpu": has_vnni(),
    }


def _fp16_record(calibration: None = None) -> dict:
    version = importlib.metadata.version("onnxconverter-common")
    return {
        "converter": f"onnxconverter-common {version} (float16.convert_float_to_float16)",
        "keep_io_types": True,
    }


@dataclass(frozen=True)
class Converter:
    """How a converted precision is made: `convert` rewrites an fp32 model graph file in place
    (given the calibration images where the precision is calibrated); `record` gives the
    manifest's account of its settings."""

    convert: Callable[[Path, Calibration | None], None]
    record: Callable[[Calibration | None], dict]


CONVERTERS = {"int8": Converter(_quantize, _int8_record), "fp16": Converter(_to_fp16, _fp16_record)}
if CONVERTERS.keys() != {p.name for p in PRECISIONS.values() if p.converted}:
    raise ImportError("every converted precision of lossx.runtime.precisions needs a converter")


def precision_record(precision: str, calibration: Calibration | None) -> dict:
    """The manifest's account of how the artifact's precision was made."""
    if not PRECISIONS[precision].converted:
        return {"name": precision}
    return {"name": precision, **CONVERTERS[precision].record(calibration)}
