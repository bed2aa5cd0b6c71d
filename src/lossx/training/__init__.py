"""Training without torch: the recipe, the loop both engines run, the ONNX Runtime engine and
its optimizers, training plans, checkpoint files, and `FineTuning`, the API an app fine-tunes
with (lossx.training.api). It never imports torch (the torch engine is
lossx.build.torch_engine)."""


def __getattr__(name: str):
    # imported on first use: the command line reads the recipe module without numpy
    if name == "FineTuning":
        from lossx.training.api import FineTuning

        return FineTuning
    raise AttributeError(f"module 'lossx.training' has no attribute {name!r}")
