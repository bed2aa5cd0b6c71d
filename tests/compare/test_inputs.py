"""A pass's batch reaches training graphs in parts labelled by their images."""

import numpy as np

from lossx.compare.inputs import InputSet, pass_batch


def test_a_pass_batch_splits_into_parts_labelled_by_their_images():
    images, labels = np.zeros((150, 3, 4, 4), np.float32), np.arange(150)
    parts = pass_batch(images, labels, 256).parts(64)
    assert [p.label for p in parts] == ["images 256-319", "images 320-383", "images 384-405"]
    assert np.array_equal(np.concatenate([p.labels for p in parts]), labels)
    small = pass_batch(images[:64], labels[:64], 0)
    assert [p is small for p in small.parts(64)] == [True]
    odd = InputSet("images 1-7 as one batch", images[:7], labels[:7], counts_for_accuracy=False)
    random = InputSet("random N=64 seed 2", sizes={"N": 64}, seed=2)
    assert [p is odd for p in odd.parts(2)] == [True]
    assert [p is random for p in random.parts(2)] == [True]
