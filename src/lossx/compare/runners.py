"""Runners: what runs a graph on a feed. The comparison sees two of them and nothing else.

`OnnxRuntimeRunner` runs an artifact's graphs (or a graph file not yet in an artifact); a
baseline artifact is an `OnnxRuntimeRunner` too. The eager PyTorch runner lives on the build
side (lossx.build.eager), which alone imports torch.
"""

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort

from lossx.runtime.artifact import Artifact, check_signature
from lossx.runtime.graphs import GraphSpec
from lossx.runtime.options import DEFAULT_SESSION, SessionOptions
from lossx.runtime.session import open_session

# ONNX ops whose input decides where a gradient goes, by kind (torch's: lossx.build.routing)
ROUTING_OPS = {"Relu": "relu", "Clip": "clip", "MaxPool": "max_pool"}


class Unjudgeable(Exception):
    """Raised by a reference runner for inputs on which fp32 results cannot be judged; its
    message says why, and the comparison reports it for the graph and inputs it skips."""


class Runner(Protocol):
    """Runs any graph an artifact describes."""

    name: str  # what it is, in words, for reports

    def run(self, graph: GraphSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`graph`'s outputs by name for `feed` (inputs by name)."""


class OnnxRuntimeRunner:
    """ONNX Runtime sessions, one per graph."""

    def __init__(
        self,
        session_for: Callable[[GraphSpec], ort.InferenceSession],
        name: str,
        folder: Path | None = None,
    ):
        self.session_for = session_for
        self.name = name
        self.folder = folder  # where the graph files are, for a repro's rerun snippet

    @classmethod
    def of_artifact(
        cls, artifact: Artifact, role: str = "artifact", options: SessionOptions = DEFAULT_SESSION
    ) -> "OnnxRuntimeRunner":
        """The artifact's graphs, in sessions opened with `options` but no memory arena (kept
        beside eager torch's float64 step, it held a training step's peak: resnet18's check at
        64x64 peaked at 4.7 GB with it, 3.1 GB without); `role` names the artifact in reports
        (e.g. "baseline artifact")."""
        options = replace(options, memory_arena=False)
        return cls(
            lambda graph: artifact.session(graph.stem, options),
            f"{role} {artifact.path} (ONNX Runtime)",
            artifact.path,
        )

    @classmethod
    def of_file(cls, path: Path) -> "OnnxRuntimeRunner":
        """One graph file not yet in an artifact, on the CPU, its session checked against the
        spec it is run for."""
        sessions = {}

        def session_for(graph: GraphSpec) -> ort.InferenceSession:
            if graph not in sessions:
                session = open_session(Path(path), SessionOptions(memory_arena=False))
                check_signature(session, graph)
                sessions[graph] = session
            return sessions[graph]

        return cls(session_for, f"ONNX Runtime on {path}", Path(path).parent)

    def run(self, graph: GraphSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session_for(graph).run(graph.output_names, feed)
        return dict(zip(graph.output_names, outputs, strict=True))

    def run_exposing_routes(
        self, graph: GraphSpec, feed: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], list[tuple[str, np.ndarray]]] | None:
        """`run`, in a session that also returns the input of each op that routes gradients
        (ROUTING_OPS, once per distinct input, in graph order) as (kind, value); None where
        the graph file is not at hand. The session is opened for the call and dropped: kept,
        its memory arena would hold a training step's peak a second time."""
        path = self.folder / graph.file if self.folder else None
        if path is None or not path.is_file():
            return None
        session, exposed = self._session_exposing_routes(graph, path)
        values = session.run([*graph.output_names, *(name for _, name in exposed)], feed)
        count = len(graph.output_names)
        outputs = dict(zip(graph.output_names, values[:count], strict=True))
        routes = [(kind, v) for (kind, _), v in zip(exposed, values[count:], strict=True)]
        return outputs, routes

    def _session_exposing_routes(
        self, graph: GraphSpec, path: Path
    ) -> tuple[ort.InferenceSession, list[tuple[str, str]]]:
        """A session of the graph file at `path` that also returns the input of each routing
        op, and those inputs as (kind, name)."""
        model = onnx.load(path)
        exposed, seen = [], set(graph.output_names)
        for node in model.graph.node:
            kind = ROUTING_OPS.get(node.op_type)
            if kind is not None and node.input[0] not in seen:
                seen.add(node.input[0])
                exposed.append((kind, node.input[0]))
                model.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
        providers = self.session_for(graph).get_providers()
        return ort.InferenceSession(model.SerializeToString(), providers=providers), exposed


class RunOnce:
    """`runner`, each graph run once per feed: a caller that needs a reference's outputs before
    the comparison (its model's logits, for standalone losses) and the comparison itself share
    one run. The last feed and outputs of each graph are kept, and a feed of the very same
    arrays gets them back."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._last: dict[str, tuple[dict, dict]] = {}

    def __getattr__(self, name: str):  # name, folder, model, run_float64: the runner's own
        return getattr(self.runner, name)

    def run(self, graph: GraphSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        last = self._last.get(graph.stem)
        same = last is not None and last[0].keys() == feed.keys()
        if same and all(last[0][name] is value for name, value in feed.items()):
            return last[1]
        outputs = self.runner.run(graph, feed)
        self._last[graph.stem] = (dict(feed), outputs)
        return outputs
