"""The eager PyTorch runner: any graph of an artifact, run as the torch module it must equal."""

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lossx.build.graph_modules import reference_module
from lossx.build.models import build_model, load_checkpoint, model_source, weights_to_arrays
from lossx.build.routing import run_routed
from lossx.compare.runners import Unjudgeable
from lossx.compare.tolerances import BN_MIN_VALUES
from lossx.errors import SpecError
from lossx.runtime.artifact import Artifact
from lossx.runtime.graphs import GraphSpec
from lossx.runtime.manifest import Manifest
from lossx.runtime.weights import check_weights


class EagerRunner:
    """Runs graphs eagerly on `model` (the model graphs run, and training graphs
    differentiate); standalone losses need no model."""

    def __init__(self, model: nn.Module | None, name: str = "eager PyTorch") -> None:
        self.model = model
        self.name = name
        self._model64: nn.Module | None = None  # made on the first run_float64

    @classmethod
    def of_artifact(
        cls,
        artifact: Artifact,
        checkpoint: Path | None = None,
        model_name: str | None = None,
        model_args: dict[str, object] | None = None,
    ) -> "EagerRunner":
        """The artifact's model rebuilt as its manifest records it (or as `model_name`, a
        registry name or MODULE:ATTR, says, constructed with `model_args` or else the
        manifest's) with the artifact's weights (`artifact.state_dict()`), or with a
        checkpoint's."""
        manifest = artifact.manifest
        if model_name is None:
            model, described = rebuild_model(manifest), manifest.model
        else:
            args = manifest.model_args if model_args is None else model_args
            model, described = build_model(model_name, args=args), f"{model_name} (--model)"
        if checkpoint is None:
            weights = artifact.state_dict()
            check_weights(weights, weights_to_arrays(model))
            model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
            weights = artifact.weights_used
        else:
            load_checkpoint(model, Path(checkpoint))
            weights = f"checkpoint {checkpoint}"
        return cls(model, f"eager PyTorch {torch.__version__}, model {described} with {weights}")

    def run(self, graph: GraphSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _run(reference_module(graph, self.model), graph, feed)

    def run_float64(self, graph: GraphSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`run` in float64 (a double-precision copy of the model, the loss and the float
        inputs): the exact values, as near as they can be computed, that fp32 results are
        judged by where two fp32 engines cannot tell which of them is right."""
        if self._model64 is None and self.model is not None:
            self._model64 = copy.deepcopy(self.model).double()
        module = reference_module(graph, self._model64).double()
        feed = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feed.items()}
        return _run(module, graph, feed)

    def run_other_kernels(
        self, graph: GraphSpec, feed: dict[str, np.ndarray]
    ) -> list[dict[str, np.ndarray]]:
        """`run` on torch's native CPU convolutions instead of oneDNN's: another correct fp32
        computation of the same step, its sums in other orders. Where a step is ill-conditioned
        (a batch norm over a few values) the two land apart: shufflenet_v2_x0_5's training
        logits 2.4e-5 and 1.0e-4 from float64 on the same 64 images."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the flags' note on TF32, for Intel GPUs
            with torch.backends.mkldnn.flags(enabled=False):
                return [self.run(graph, feed)]

    def run_float64_routed(
        self,
        graph: GraphSpec,
        feed: dict[str, np.ndarray],
        routes: Sequence[tuple[str, np.ndarray]],
    ) -> dict[str, np.ndarray] | None:
        """`run_float64` with each ReLU, clip and max pool routing the gradient as the engine
        whose inputs to them are `routes` did (lossx.build.routing); None where its ops do
        not line up with the model's."""
        return run_routed(lambda: self.run_float64(graph, feed), routes)


def _run(module: nn.Module, graph: GraphSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad(), warnings.catch_warnings(), _judgeable_batch_norms(module):
        warnings.simplefilter("ignore")  # e.g. KLDivLoss's note on reduction="mean"
        outputs = module(*(torch.from_numpy(feed[name]) for name in graph.input_names))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {name: value.numpy() for name, value in zip(graph.output_names, outputs, strict=True)}


@contextmanager
def _judgeable_batch_norms(module: nn.Module) -> Iterator[None]:
    """Within it, a train-mode batch norm of `module` over fewer than BN_MIN_VALUES values per
    channel raises Unjudgeable: fp32 keeps too few digits of such a step to judge it by."""

    def refuse_few(norm: nn.Module, args: tuple) -> None:
        values = args[0].numel() // max(args[0].shape[1], 1)
        if norm.training and values < BN_MIN_VALUES:
            raise Unjudgeable(
                f"a train-mode batch norm over {values} value{'s' * (values != 1)} per channel "
                f"(fewer than {BN_MIN_VALUES}: fp32 keeps too few digits of its variance to "
                "judge by); compared on the other batches"
            )

    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [norm.register_forward_pre_hook(refuse_few) for norm in norms]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def rebuild_model(manifest: Manifest) -> nn.Module:
    """The eager model an artifact was exported from: from the registry, or imported again from
    the manifest's MODULE:ATTR, refused when that source changed since the export."""
    try:
        model = build_model(manifest.model, args=manifest.model_args)
        source = model_source(manifest.model)
    except SpecError as e:
        why = str(e).removeprefix(f"--model {manifest.model}: ")
        module = manifest.model.partition(":")[0]
        if f"No module named '{module.split('.')[0]}'" in why:
            file = (manifest.model_source or {}).get("file") or f"{module}.py"
            why += (
                f"; run lossx from the folder that holds {file} (it imports from the current "
                "directory), put that folder on PYTHONPATH, or name the model with --model"
            )
        raise SpecError(
            f"cannot rebuild the eager model the artifact records ({manifest.model}): {why}"
        ) from None
    recorded = manifest.model_source
    if recorded and source and recorded.get("sha256") != source.get("sha256"):
        raise SpecError(
            f"{source['file']} changed since {manifest.model} was exported (sha256 "
            f"{source['sha256'][:12]}..., the manifest records {str(recorded.get('sha256'))[:12]}"
            "...); export again, or compare against the source it was exported from"
        )
    return model
