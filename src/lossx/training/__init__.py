"""Training without torch: the recipe, the loop both engines run, the ONNX Runtime engine and
its optimizers, training plans and checkpoint files. It never imports torch (the torch engine
is lossx.build.torch_engine)."""
