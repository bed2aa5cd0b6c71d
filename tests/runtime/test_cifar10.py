import os
import pickle
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossx.errors import DataError
from lossx.runtime.cifar10 import (
    CLASS_NAMES,
    StreamedImages,
    load_cifar10,
    load_packaged_sample,
    read_batch,
)
from tests.conftest import SHARED_CIFAR10, require_shared, shared_cifar10_dir

FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]  # SOURCE.md
TEST_CLASS_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]


def test_ci_reads_the_shared_dataset():
    """In CI the real dataset must be there: tests never quietly fall back to the sample."""
    if os.environ.get("CI"):
        assert shared_cifar10_dir() is not None, f"CI needs {SHARED_CIFAR10}"


def test_test_split_is_the_official_test_images(test_split):
    assert test_split.images.shape == (1000, 32, 32, 3)
    assert test_split.images.dtype == np.uint8
    assert test_split.labels.dtype == np.int64
    assert test_split.labels[:20].tolist() == FIRST_TEST_LABELS
    assert np.bincount(test_split.labels).tolist() == TEST_CLASS_COUNTS
    assert test_split.images[0, 0, :3, 0].tolist() == [158, 159, 165]  # first R values
    assert test_split.images[1, 0, :3, 0].tolist() == [235, 231, 232]
    assert test_split.class_names == CLASS_NAMES


def test_batch_files_and_packaged_sample_hold_the_same_images(cifar_dir):
    sample = load_packaged_sample()
    require_shared(cifar_dir)
    batches = load_cifar10(cifar_dir, "test")
    np.testing.assert_array_equal(batches.images, sample.images)
    np.testing.assert_array_equal(batches.labels, sample.labels)


def test_train_split_is_the_full_training_set(cifar_dir):
    require_shared(cifar_dir)
    train = load_cifar10(cifar_dir, "train")
    assert train.images.shape == (50_000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [5000] * 10
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert train.images[0, 0, :11, 0].tolist() == [59, 43, 50, 68, 98, 119, 139, 145, 149, 149, 131]


def test_limit_takes_the_first_images(test_split, cifar_dir):
    head = load_cifar10(cifar_dir, "test", limit=7) if cifar_dir else load_packaged_sample().head(7)
    assert len(head) == 7
    np.testing.assert_array_equal(head.images, test_split.images[:7])


def test_data_dir_may_be_the_batches_folder_itself(cifar_dir):
    require_shared(cifar_dir)
    split = load_cifar10(cifar_dir / "cifar-10-batches-py", "test", limit=3)
    assert split.labels.tolist() == FIRST_TEST_LABELS[:3]


def _write_batch(path, data, labels, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"data": data, "labels": labels, **extra}, protocol=2))
    return path


def test_batches_pickled_by_python3_load(tmp_path):
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    batch = {b"batch_label": b"x", b"data": data, b"labels": [1, 9]}  # bytes keys, as py2
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(batch, protocol=2))
    split = load_cifar10(tmp_path, "test")
    assert split.labels.tolist() == [1, 9]
    np.testing.assert_array_equal(split.images[1].transpose(2, 0, 1).reshape(-1), data[1])


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"refused to load (posix|os)\.system"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("data", "labels", "message"),
    [
        (np.zeros((2, 3072), np.float32), [0, 1], "images must be a uint8 array, got float32"),
        (
            np.zeros((2, 100), np.uint8),
            [0, 1],
            r"shape \[N,3072\] or \[N,32,32,3\], got \[2, 100\]",
        ),
        (np.zeros((2, 3072), np.uint8), [0], "2 images but 1 labels"),
        (np.zeros((2, 3072), np.uint8), [0, 10], "label 10 out of range 0..9"),
        (np.zeros((2, 3072), np.uint8), [-1, 0], "label -1 out of range 0..9"),
        (np.zeros((2, 3072), np.uint8), ["a", "b"], "labels must be a list of integers"),
        ("not an array", [0], "images must be a uint8 array, got str"),
    ],
)
def test_malformed_batches_are_refused(tmp_path, data, labels, message):
    path = _write_batch(tmp_path / "cifar-10-batches-py" / "test_batch", data, labels)
    with pytest.raises(DataError, match=message):
        read_batch(path)


def test_batch_without_expected_keys_is_refused(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({"images": 1}, protocol=2))
    with pytest.raises(DataError, match=r"no data, labels key"):
        read_batch(path)


def test_non_dict_pickle_is_refused(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(DataError, match=r"holds list, not dict"):
        read_batch(path)


def test_directory_without_batches_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"no CIFAR-10 test batches .*test_batch"):
        load_cifar10(tmp_path, "test")


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        load_cifar10(tmp_path / "nowhere", "test")


def test_missing_split_file_is_refused(tmp_path, cifar_dir):
    require_shared(cifar_dir)
    (tmp_path / "cifar-10-batches-py").mkdir()
    shutil.copy(cifar_dir / "cifar-10-batches-py" / "test_batch", tmp_path / "cifar-10-batches-py")
    with pytest.raises(DataError, match=r"missing data_batch_1 for the train split"):
        load_cifar10(tmp_path, "train")


def test_packaged_sample_has_no_train_split():
    with pytest.raises(DataError, match=r"test images only"):
        load_cifar10(None, "train")


_VALID_BATCH = pickle.dumps(
    {"batch_label": "t", "data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]}, protocol=2
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.integers(0, len(_VALID_BATCH)),
    flips=st.lists(
        st.tuples(st.integers(0, len(_VALID_BATCH) - 1), st.integers(0, 255)), max_size=4
    ),
)
def test_corrupted_batches_give_a_data_error_or_a_valid_batch(tmp_path, cut, flips):
    content = bytearray(_VALID_BATCH)
    for position, value in flips:
        content[position] = value
    path = tmp_path / "test_batch"
    path.write_bytes(bytes(content[:cut]))
    try:
        images, labels = read_batch(path)
    except DataError:
        return
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    assert len(labels) == len(images)


def test_a_streamed_split_reads_the_same_images(cifar_dir):
    require_shared(cifar_dir)
    whole = load_cifar10(cifar_dir, "train", limit=20_000)
    streamed = load_cifar10(cifar_dir, "train", limit=20_000, stream=True)
    assert isinstance(streamed.images, StreamedImages) and len(streamed) == 20_000
    np.testing.assert_array_equal(streamed.labels, whole.labels)
    for start, stop in [(0, 5), (9_990, 10_010), (19_995, 20_000), (0, 20_000), (30_000, 30_005)]:
        np.testing.assert_array_equal(streamed.images[start:stop], whole.images[start:stop])
    np.testing.assert_array_equal(streamed.head(7).images[:], whole.images[:7])
    with pytest.raises(TypeError, match="contiguous slices"):
        streamed.images[::2]
