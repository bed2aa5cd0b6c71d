"""What the model expects: uint8 HWC RGB images become float32 NCHW in [0, 1].

This is exactly torchvision's `ToTensor()` (a division by 255 in float32), the transform the
model was trained with. The manifest records the same facts as `PREPROCESSING`.
"""

import numpy as np

PREPROCESSING = {
    "input": "uint8 RGB images, HWC layout, shape [N,32,32,3]",
    "output": "float32 NCHW tensor, shape [N,3,32,32]",
    "scale": "x / 255 (float32), no mean or std normalisation",
    "equivalent": "torchvision.transforms.ToTensor()",
    "files": "image files (lossx predict): converted to RGB, resized to 32x32 (Pillow bilinear)",
}


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Turn uint8 images [N,32,32,3] (HWC, RGB) into the model's float32 [N,3,32,32] input."""
    return scale(to_chw(images))


def to_chw(images: np.ndarray) -> np.ndarray:
    """uint8 [N,32,32,3] (HWC) to contiguous uint8 [N,3,32,32] (CHW), the model's layout."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def scale(images: np.ndarray) -> np.ndarray:
    """uint8 [N,3,32,32] (CHW) to the model's float32 values in [0, 1]."""
    return images.astype(np.float32) / np.float32(255)
