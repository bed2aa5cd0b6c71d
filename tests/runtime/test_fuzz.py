"""Fuzzing the readers of untrusted input: the manifest loader and the runtime's input checks.

Every draw must end in a clean result or the documented error (ArtifactError, DataError), never
another exception. The budget is fixed; LOSSX_PROPERTY_SCALE multiplies it. The CIFAR-10 batch
reader's fuzz test is in test_cifar10.py.
"""

import copy
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lossx.errors import ArtifactError, DataError
from lossx.runtime import Prediction, load_manifest, open_artifact

SCALE = int(os.environ.get("LOSSX_PROPERTY_SCALE", "1"))
FUZZ = settings(
    max_examples=150 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def manifest(artifact_dir):
    return json.loads((artifact_dir / "manifest.json").read_text())


def _paths(value, prefix=()):
    """Every path into a JSON value, as tuples of keys and indices."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


@FUZZ
@given(data=st.data())
def test_manifest_loader_never_crashes(manifest, tmp_path_factory, data):
    damaged = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(damaged))[1:]))
        parent = damaged
        for step in path[:-1]:
            parent = parent[step]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON)
    folder = tmp_path_factory.mktemp("manifest")
    (folder / "manifest.json").write_text(json.dumps(damaged))
    try:
        load_manifest(folder)
    except ArtifactError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def runtime(artifact_dir):
    return open_artifact(artifact_dir, threads=1)


ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.float32, np.float64, np.int64, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=34),
    elements={"allow_nan": True, "allow_infinity": True},
) | hnp.arrays(  # near-valid shapes, where the value checks matter
    dtype=st.sampled_from([np.uint8, np.float32]),
    shape=st.sampled_from(
        [(1, 32, 32, 3), (2, 3, 32, 32), (32, 32, 3), (3, 32, 32), (0, 3, 32, 32)]
    ),
)


@FUZZ
@given(images=ARRAYS)
def test_predict_checks_every_input(runtime, images):
    try:
        prediction = runtime.predict(images)
    except DataError as e:
        assert "\n" not in str(e) and str(e).startswith("images")
        return
    assert isinstance(prediction, Prediction)
    assert prediction.logits.shape[1] == 10 and np.isfinite(prediction.logits).all()


@FUZZ
@given(
    logits=hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12)),
    labels=hnp.arrays(
        st.sampled_from([np.int64, np.int32, np.float32]),
        hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=12),
    ),
)
def test_loss_checks_every_input(runtime, logits, labels):
    try:
        loss = runtime.loss("ce", logits=logits, labels=labels)
    except DataError as e:
        assert "\n" not in str(e)
        return
    assert loss.shape == ()
