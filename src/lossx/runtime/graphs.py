"""The graphs an artifact holds, described once: names, dtypes and shapes of every input and output.

Export builds graphs to these specs and the runtime validates artifacts against them, so the two
cannot disagree. A shape entry is an int (fixed) or a str (a symbolic, dynamic dimension).
"""

from dataclasses import dataclass

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)

# Loss name -> the kind of target it takes: class indices (int64 [N]) or a dense float tensor.
LOSS_TARGETS = {"ce": "class_index", "mse": "dense", "l1": "dense"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32" or "int64"
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    stem: str  # file name without ".onnx"
    kind: str  # "model", "loss" or "fused"
    loss: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.stem}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


_IMAGES = TensorSpec("images", "float32", ("N", *IMAGE_SHAPE))
_LOGITS = TensorSpec("logits", "float32", ("N", NUM_CLASSES))
_LOSS = TensorSpec("loss", "float32", ())


def model_graph() -> GraphSpec:
    """`model.onnx`: images float32 [N,3,32,32] -> logits float32 [N,10]."""
    return GraphSpec("model", "model", None, (_IMAGES,), (_LOGITS,))


def loss_graph(loss: str) -> GraphSpec:
    """`loss_<loss>.onnx`: the loss alone, on logits/labels (ce) or input/target (dense losses)."""
    if LOSS_TARGETS[loss] == "class_index":
        inputs = (
            TensorSpec("logits", "float32", ("N", "C")),
            TensorSpec("labels", "int64", ("N",)),
        )
    else:
        inputs = (
            TensorSpec("input", "float32", ("N", "D")),
            TensorSpec("target", "float32", ("N", "D")),
        )
    return GraphSpec(f"loss_{loss}", "loss", loss, inputs, (_LOSS,))


def fused_graph(loss: str) -> GraphSpec:
    """`model_<loss>.onnx`: model and loss in one graph -> logits and loss."""
    if LOSS_TARGETS[loss] == "class_index":
        target = TensorSpec("labels", "int64", ("N",))
    else:
        target = TensorSpec("targets", "float32", ("N", NUM_CLASSES))
    return GraphSpec(f"model_{loss}", "fused", loss, (_IMAGES, target), (_LOGITS, _LOSS))


def artifact_graphs(losses: list[str]) -> list[GraphSpec]:
    """Every graph an artifact with these losses holds, model first."""
    return [model_graph(), *(loss_graph(n) for n in losses), *(fused_graph(n) for n in losses)]
