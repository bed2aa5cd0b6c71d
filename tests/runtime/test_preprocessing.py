import numpy as np
from torchvision.transforms import ToTensor

from lossx.runtime import to_model_input


def test_preprocessing_is_exactly_to_tensor(test_split):
    expected = np.stack([ToTensor()(image).numpy() for image in test_split.images])
    got = to_model_input(test_split.images)
    assert got.dtype == np.float32 and got.shape == (1000, 3, 32, 32)
    np.testing.assert_array_equal(got, expected)
