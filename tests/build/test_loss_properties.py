"""Every loss spec, exported to ONNX, computes what torch.nn computes: a property-based proof.

Hypothesis draws a loss with any of its options, the rank and sizes of the inputs (batch 1 and
odd sizes included), the scale of the values (logits up to 1e4), and how many labels are
ignore_index (up to all of them, where torch's mean is NaN); ONNX Runtime must then match eager
torch.nn within atol = rtol = 1e-5 (bench/loss_parity.py measures how much of that is used).
The example budget is fixed; LOSSX_PROPERTY_SCALE=20 runs twenty times as many draws.
"""

import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossx.build.graph_export import export_graph
from lossx.build.graph_modules import reference_module
from lossx.build.models import build_model
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.graphs import fused_graph, loss_graph, model_graph
from lossx.runtime.loss_specs import LOSSES, LossSpec, make_loss_spec, parse_loss_spec
from lossx.runtime.options import SessionOptions
from lossx.runtime.session import open_session
from tests.conftest import compare_fp32, sample_tensors

MODEL = model_graph(CONTRACT.shape, CONTRACT.num_classes)

SCALE = int(os.environ.get("LOSSX_PROPERTY_SCALE", "1"))
VALUE_SCALES = (1.0, 30.0, 1e4)
IGNORE_FRACTIONS = (0.0, 0.3, 1.0)


@st.composite
def loss_specs(draw, weight_length: int | None = None) -> LossSpec:
    """Any loss with a random subset of its options set to random valid values."""
    name = draw(st.sampled_from(list(LOSSES)))
    length = weight_length or draw(st.integers(1, 6))
    options = {}
    for option in LOSSES[name].options:
        if not draw(st.booleans()):
            continue  # keep torch's default
        if option.kind == "choice":
            value = draw(st.sampled_from(option.choices))
        elif option.kind == "bool":
            value = draw(st.booleans())
        elif option.kind == "int":
            value = draw(st.sampled_from([-100, -1, 0, 1]))
        elif option.kind == "floats":
            value = draw(st.lists(st.floats(0, 5), min_size=length, max_size=length))
        else:
            low = option.minimum + (1e-3 if option.minimum_excluded else 0.0)
            value = draw(st.floats(low, option.maximum if option.maximum is not None else 3.0))
        options[option.name] = value
    if options.get("target") == "probs":
        options.pop("ignore_index", None)
    return make_loss_spec(name, **options)


class GraphCache:
    """Each (spec, rank) exported once per test session, with its ONNX Runtime session."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self.graphs = {}
        self.model = build_model("tudui", seed=0)

    def get(self, spec, extra_dims: int = 0, fused: bool = False):
        key = (spec, extra_dims, fused)
        if key not in self.graphs:
            graph = fused_graph(spec, MODEL) if fused else loss_graph(spec, extra_dims)
            path = self.directory / f"{len(self.graphs)}.onnx"
            export_graph(graph, self.model, path)
            self.graphs[key] = (graph, open_session(path, SessionOptions("cpu")))
        return self.graphs[key]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    return GraphCache(tmp_path_factory.mktemp("loss-graphs"))


def _sizes(draw, spec: LossSpec) -> dict[str, int]:
    sizes = {name: draw(st.integers(1, 5)) for name in ("C", "D", "d1", "d2")}
    sizes["N"] = draw(st.sampled_from([1, 2, 3, 7, 9]))
    return sizes


def assert_matches_torch(graph, session, module, inputs) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KLDivLoss's note on reduction="mean"
        eager = module(*inputs)
    eager = eager if isinstance(eager, tuple) else (eager,)
    feed = {t.name: x.numpy() for t, x in zip(graph.inputs, inputs, strict=True)}
    for name, got, want in zip(
        graph.output_names, session.run(graph.output_names, feed), eager, strict=True
    ):
        assert got.shape == tuple(want.shape), f"{graph.loss} {name}: shape {got.shape}"
        result = compare_fp32(got, want.numpy())
        assert result.passed, (
            f"{graph.loss} {name}: max abs error {result.max_abs_error:.3g}, "
            f"{result.max_tolerance_used:.1f}x the tolerance"
        )


@settings(
    max_examples=80 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(spec=loss_specs(), extra_dims=st.integers(0, 2), data=st.data())
def test_loss_graph_matches_torch(graphs, spec, extra_dims, data):
    graph, session = graphs.get(spec, extra_dims)
    inputs = sample_tensors(
        graph,
        _sizes(data.draw, spec),
        seed=data.draw(st.integers(0, 2**31)),
        scale=data.draw(st.sampled_from(VALUE_SCALES)),
        ignore_fraction=data.draw(st.sampled_from(IGNORE_FRACTIONS)),
    )
    assert_matches_torch(graph, session, reference_module(graph, graphs.model), inputs)


@settings(
    max_examples=15 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(spec=loss_specs(weight_length=CONTRACT.num_classes), data=st.data())
def test_fused_graph_matches_torch(graphs, spec, data):
    graph, session = graphs.get(spec, fused=True)
    inputs = sample_tensors(
        graph,
        {"N": data.draw(st.sampled_from([1, 2, 5, 9]))},
        seed=data.draw(st.integers(0, 2**31)),
        ignore_fraction=data.draw(st.sampled_from(IGNORE_FRACTIONS)),
    )
    assert_matches_torch(graph, session, reference_module(graph, graphs.model), inputs)


def test_all_ignored_labels_give_nan_like_torch(graphs):
    """torch's mean over no kept targets is 0/0; the graph must say NaN too, not 0."""
    for text in ("ce", "nll", "ce(label_smoothing=0.3, weight=[1, 2, 3])"):
        graph, session = graphs.get(parse_loss_spec(text))
        inputs = sample_tensors(graph, {"N": 4, "C": 3}, seed=0, ignore_fraction=1.0)
        feed = {t.name: x.numpy() for t, x in zip(graph.inputs, inputs, strict=True)}
        (loss,) = session.run(None, feed)
        assert np.isnan(loss)
        assert torch.isnan(reference_module(graph, graphs.model)(*inputs))


def test_class_dim_losses_are_the_class_index_ones():
    assert {name for name, info in LOSSES.items() if info.class_dim} == {"ce", "nll"}
