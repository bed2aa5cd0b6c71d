"""Writing an artifact: every graph, the precision lowering, the weights file, the weights'
provenance and the manifest, then loaded back as the runtime will load it."""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import onnxscript
import torch
from torch import nn

import lossx
from lossx.build.calibration import Calibration
from lossx.build.graph_export import Graphs, export_verified
from lossx.build.models import (
    load_checkpoint,
    packaged_weights,
    weights_to_arrays,
)
from lossx.build.precision import (
    lower_model,
    precision_record,
    splice_model,
)
from lossx.build.self_check import self_check_images, verify_graph
from lossx.build.surgery import default_opset
from lossx.build.torch_engine import CHECKPOINT_FORMAT as TORCH_CHECKPOINT_FORMAT
from lossx.errors import ExportError, SpecError
from lossx.runtime.artifact import load_artifact, sha256_of
from lossx.runtime.contract import ImageContract
from lossx.runtime.graphs import GraphKind, GraphSpec, TensorSpec
from lossx.runtime.loss_specs import LossSpec
from lossx.runtime.manifest import MANIFEST_FILE, GraphEntry, Manifest
from lossx.runtime.precisions import PRECISIONS
from lossx.training.checkpoints import CHECKPOINT_FORMAT as ORT_CHECKPOINT_FORMAT

WEIGHTS_FILE = "weights.npz"


INITS = ("trained", "random")


def tensor_facts(tensors: tuple[TensorSpec, ...]) -> str:
    return json.dumps([t.to_dict() for t in tensors])


def producer_versions() -> dict[str, str]:
    return {
        "lossx": lossx.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def weights_record(
    model: nn.Module, model_name: str, init: str, checkpoint: Path | None, seed: int
) -> dict:
    """Load the weights the export asks for; return the manifest's account of them."""
    if init not in INITS:
        raise SpecError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if checkpoint is None and init == "random":
        return {"file": WEIGHTS_FILE, "source": "seed", "seed": seed}
    source = "checkpoint" if checkpoint is not None else "packaged"
    path = Path(checkpoint) if checkpoint is not None else packaged_weights(model_name)
    payload = load_checkpoint(model, path)
    weights = {
        "file": WEIGHTS_FILE,
        "source": source,
        "checkpoint": path.name,
        "checkpoint_sha256": sha256_of(path),
    }
    engines = {TORCH_CHECKPOINT_FORMAT: "torch", ORT_CHECKPOINT_FORMAT: "onnxruntime"}
    if isinstance(payload, dict) and payload.get("format") in engines:
        history = payload.get("history") or [{}]
        weights["recipe"] = payload.get("config")
        weights["trained"] = {
            "engine": engines[payload["format"]],
            "epochs": history[-1].get("epoch"),
            "seconds": round(sum(e.get("seconds", 0.0) for e in history), 1),
            "final_eval": {k: history[-1].get(k) for k in ("eval_split", "eval_accuracy")},
        }
        if payload.get("torch"):
            weights["trained"]["torch"] = payload["torch"]
    return weights


def write_artifact(
    staged: Path,
    model: nn.Module,
    model_name: str,
    source: dict | None,
    model_args: dict,
    losses: list[LossSpec],
    graphs: list[GraphSpec],
    weights: dict,
    opset: int,
    progress: Callable[[str], None] | None,
    contract: ImageContract,
    precision: str = "fp32",
    calibration: Calibration | None = None,
) -> Manifest:
    """Write the artifact into folder `staged`: every graph, each verified (on images of
    `contract`), converted to `precision` where it follows it, the weights file and the
    manifest, which the runtime then loads as it would any artifact."""
    producer = producer_versions()
    common = {
        "lossx.model": model_name,
        "lossx.class_names": json.dumps(contract.class_names),
        "lossx.preprocessing": json.dumps(contract.to_manifest()),
        "lossx.weights": json.dumps(weights),
        **{f"producer.{k}": v for k, v in producer.items()},
    }
    entries = _exported_graphs(staged, model, graphs, opset, common, progress, contract)
    if PRECISIONS[precision].converted:
        entries = [
            lowered(e, model, staged, precision, calibration, progress, contract)
            if e.spec.kind.follows_precision
            else e
            for e in entries
        ]
    np.savez(staged / WEIGHTS_FILE, **weights_to_arrays(model))
    files = sorted([e.spec.file for e in entries] + [WEIGHTS_FILE])
    manifest = Manifest(
        model=model_name,
        model_source=source,
        model_args=model_args,
        opset=opset,
        class_names=contract.class_names,
        preprocessing=contract.to_manifest(),
        losses=tuple(losses),
        weights=weights,
        graphs=tuple(entries),
        files={
            name: {"sha256": sha256_of(staged / name), "bytes": (staged / name).stat().st_size}
            for name in files
        },
        producer=producer,
        precision=precision_record(precision, calibration),
    )
    (staged / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    load_artifact(staged)  # the runtime must accept exactly what was written
    return manifest


def _exported_graphs(
    staged: Path,
    model: nn.Module,
    graphs: list[GraphSpec],
    opset: int,
    common: dict[str, str],
    progress: Callable[[str], None] | None,
    contract: ImageContract,
) -> list[GraphEntry]:
    """Every graph exported into `staged` and verified, with the `common` metadata and its
    own, in the order of `graphs`; the loss graphs exported in one torch.onnx call where there
    are several. Training graphs go first: tracing the step is what finds an op with no ONNX
    backward, and it refuses before minutes of other exports."""
    entries = {}
    loss_graphs = [g for g in graphs if g.kind is GraphKind.LOSS]
    exports = Graphs(model, opset, loss_graphs if len(loss_graphs) > 1 else (), contract)
    for spec in sorted(graphs, key=lambda g: g.kind is not GraphKind.TRAIN):
        if progress:
            progress(spec.file)
        metadata = {
            **common,
            "lossx.graph": str(spec.kind),
            "lossx.inputs": tensor_facts(spec.inputs),
            "lossx.outputs": tensor_facts(spec.outputs),
        }
        if spec.loss:
            metadata["lossx.loss"] = json.dumps(spec.loss.to_dict())
        proto = export_verified(spec, model, staged / spec.file, metadata, exports)
        entries[spec] = GraphEntry(spec, opset, proto.ir_version)
    return [entries[spec] for spec in graphs]


def lowered(
    entry: GraphEntry,
    model: nn.Module,
    staged: Path,
    precision: str,
    calibration: Calibration | None,
    progress: Callable[[str], None] | None,
    contract: ImageContract,
) -> GraphEntry:
    """Graph `entry` (model first, then the fused graphs), verified in fp32, converted to
    `precision` and verified again against eager under that precision's profile, on the
    packaged test images too (int8 is compared on real images only)."""
    spec, path = entry.spec, staged / entry.spec.file
    if progress:
        progress(f"{spec.file} at {precision}")
    if spec.kind is GraphKind.MODEL:
        lower_model(path, spec, precision, calibration)
    else:
        splice_model(path, staged / "model.onnx", spec, precision)
    proto = onnx.load(path)
    if default_opset(proto) != entry.opset:
        raise ExportError(
            f"{spec.file}: the {precision} converter wrote opset {default_opset(proto)}, "
            f"not {entry.opset}"
        )
    profile = PRECISIONS[precision].tolerance_profile
    verify_graph(spec, model, path, contract, profile, self_check_images(contract, None))
    return GraphEntry(spec, entry.opset, proto.ir_version)


def export_summary(manifest: Manifest, out_dir: Path) -> str:
    """What `lossx export` prints: the graphs, each file with its size and sha256, and the
    manifest's own sha256 (what --require-sha256 pins)."""
    lines = [
        f"wrote {out_dir}: {len(manifest.graphs)} graphs at opset {manifest.opset}, model "
        f"{manifest.precision_name}, each verified against eager PyTorch",
        f"images: {manifest.contract.describe()}",
    ]
    for name, info in manifest.files.items():
        lines.append(f"  {name:<16} {info['bytes']:>9,} bytes  sha256 {info['sha256']}")
    digest = sha256_of(Path(out_dir) / MANIFEST_FILE)
    lines.append(f"manifest.json sha256 {digest} (pin it with --require-sha256)")
    return "\n".join(lines)
