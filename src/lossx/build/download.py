"""Fetch the full CIFAR-10 dataset with torchvision, where a network exists."""

from pathlib import Path

from lossx.errors import EnvironmentProblem, first_line


def download_cifar10(data_dir: Path) -> None:
    """Download and unpack CIFAR-10 into `data_dir/cifar-10-batches-py` (md5-checked)."""
    from torchvision.datasets import CIFAR10

    created = not Path(data_dir).exists()
    try:
        CIFAR10(str(data_dir), train=True, download=True)
    except Exception as e:  # urllib, ssl and socket errors alike
        if created and Path(data_dir).is_dir() and not any(Path(data_dir).iterdir()):
            Path(data_dir).rmdir()  # leave nothing behind
        raise EnvironmentProblem(
            f"CIFAR-10 download into {data_dir} failed: {first_line(e)}"
        ) from None
