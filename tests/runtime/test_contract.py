import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import Compose, Normalize, ToTensor

from lossx.errors import SpecError
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.contract import (
    ImageContract,
    contract_for,
    parse_class_names,
    parse_numbers,
    parse_shape,
)
from lossx.runtime.images import load_image


def test_preprocessing_is_exactly_to_tensor(test_split):
    expected = np.stack([ToTensor()(image).numpy() for image in test_split.images])
    got = CONTRACT.to_model_input(test_split.images)
    assert got.dtype == np.float32 and got.shape == (1000, 3, 32, 32)
    np.testing.assert_array_equal(got, expected)


def test_normalised_preprocessing_is_exactly_to_tensor_then_normalize(test_split):
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    contract = contract_for((3, 32, 32), CONTRACT.class_names, mean, std)
    transform = Compose([ToTensor(), Normalize(mean, std)])
    expected = np.stack([transform(image).numpy() for image in test_split.images[:200]])
    np.testing.assert_array_equal(contract.to_model_input(test_split.images[:200]), expected)
    low, high = contract.pixel_range()
    assert low == pytest.approx(min(-m / s for m, s in zip(mean, std, strict=True)))
    assert high == pytest.approx(max((1 - m) / s for m, s in zip(mean, std, strict=True)))


def test_the_contract_round_trips_through_the_manifest_form():
    contract = contract_for((1, 28, 20), ("zero", "one"), (0.5,), (0.25,), "crop")
    assert contract.mean == (0.5,) and contract.shape == (1, 28, 20)
    again = ImageContract.from_manifest(contract.to_manifest(), contract.class_names)
    assert again == contract
    edited = contract.to_manifest() | {"scale": 127.5}
    with pytest.raises(ValueError, match="preprocessing differs"):
        ImageContract.from_manifest(edited, contract.class_names)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: contract_for((3, 8, 8), ("a",), (0.1, 0.2)), "--mean: 2 values for 3 channels"),
        (lambda: contract_for((3, 8, 8), ("a",), std=(0,)), "std must be positive"),
        (lambda: contract_for((3, 8, 8), ("a", "a")), "class names repeat a name"),
        (lambda: contract_for((3, 8, 8), ("a",), resize="fit"), "unknown resize policy 'fit'"),
        (lambda: parse_shape("3,64"), "expected C,H,W"),
        (lambda: parse_shape("3,0,64"), "three positive integers"),
        (lambda: parse_shape("3,9000,64"), "at most 4096"),
        (lambda: parse_numbers("0.5,x", "--mean"), "--mean: expected numbers"),
        (lambda: parse_class_names("a,,b"), "an empty name"),
    ],
)
def test_bad_contracts_are_refused_in_one_line(make, message):
    with pytest.raises(SpecError, match=message):
        make()


def test_image_files_are_fitted_by_the_resize_policy(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 6:34] = 255  # a white centre between black sides
    Image.fromarray(wide).save(tmp_path / "wide.png")
    stretched = load_image(tmp_path / "wide.png", contract_for((3, 10, 10), ("a",)))
    cropped = load_image(tmp_path / "wide.png", contract_for((3, 10, 10), ("a",), resize="crop"))
    grey = load_image(tmp_path / "wide.png", contract_for((1, 10, 10), ("a",), resize="crop"))
    assert stretched.shape == cropped.shape == (10, 10, 3) and grey.shape == (10, 10, 1)
    assert stretched[:, 0].max() == 0  # the black sides stay, squeezed
    assert cropped.min() == 255 and grey.min() == 255  # the centre alone fills the square
