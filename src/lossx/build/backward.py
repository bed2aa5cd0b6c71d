"""Training graphs: the loss and the gradient of every parameter, in standard ONNX ops.

torch.onnx cannot export a backward pass (it has no translation for convolution_backward), so
lossx writes the backward of each supported layer out in forward ops that export cleanly:

- Linear: dW = dy^T x, db = sum(dy), dx = dy W;
- Conv2d (stride 1, zero padding): dW as an im2col (a Conv with a one-hot kernel) and one
  batched MatMul, db = sum(dy), dx as a Conv2d of dy with the flipped, transposed kernel;
- MaxPool2d (2x2, stride 2): the gradient goes to the first maximum of each window in row-major
  order, as torch's does, by comparisons (no ScatterElements);
- Flatten: a reshape.

The loss gradient is written out too, for ce (every option, class-index or probability
targets), mse and l1 with reduction mean or sum. Every training graph is checked against
torch.autograd (ReferenceTrainingStep) before it lands.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lossx.build.losses import OnLogits, reference_loss
from lossx.errors import SpecError
from lossx.runtime.loss_specs import LossSpec

TRAINABLE_LOSSES = ("ce", "mse", "l1")
_POOLS = ((2, 2, 0), ((2, 2), (2, 2), 0))  # 2x2 max-pooling, stride 2, no padding


def check_trainable(model: nn.Module, loss: LossSpec) -> None:
    """Refuse a model or loss whose backward lossx cannot write in standard ONNX, naming it."""
    if loss.name not in TRAINABLE_LOSSES:
        raise SpecError(
            f"--train: no ONNX backward for loss {loss.name} yet; training graphs support "
            f"{', '.join(TRAINABLE_LOSSES)}"
        )
    if loss["reduction"] == "none":
        raise SpecError(f"--train: {loss} has no scalar loss to differentiate; use mean or sum")
    for name, layer in _layers(model):
        if isinstance(layer, nn.Conv2d | nn.Linear) and layer.bias is None:
            raise SpecError(f"--train: no ONNX backward for {name} without a bias yet")
        if isinstance(layer, nn.Conv2d):
            if (
                layer.stride != (1, 1)
                or layer.dilation != (1, 1)
                or layer.groups != 1
                or layer.padding_mode != "zeros"
                or layer.kernel_size[0] != layer.kernel_size[1]
                or isinstance(layer.padding, str)
                or layer.padding[0] != layer.padding[1]
            ):
                raise SpecError(f"--train: no ONNX backward for {name} ({layer}) yet")
        elif isinstance(layer, nn.MaxPool2d):
            if (layer.kernel_size, layer.stride, layer.padding) not in _POOLS:
                raise SpecError(f"--train: no ONNX backward for {name} ({layer}) yet")
        elif not isinstance(layer, nn.Linear | nn.Flatten):
            raise SpecError(
                f"--train: no ONNX backward for {name} ({type(layer).__name__}) yet; training "
                "graphs support Conv2d, MaxPool2d, Flatten and Linear"
            )


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not list(m.children())]


def _pool_backward(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dx of a 2x2 max-pooling y = pool(x): dy goes to the first maximum of each window."""
    a, b = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]
    c = x[:, :, 1::2, 0::2]
    first = a == y
    second = (b == y) & ~first
    third = (c == y) & ~(first | second)
    fourth = ~(first | second | third)
    # Mul by a 0/1 mask: ONNX Runtime's Where took 4x as long
    ga, gb, gc, gd = (dy * t.to(dy.dtype) for t in (first, second, third, fourth))
    top = torch.stack([ga, gb], -1).flatten(-2)
    bottom = torch.stack([gc, gd], -1).flatten(-2)
    return torch.stack([top, bottom], 3).flatten(2, 3)


def _conv_backward(dy, x, weight, padding: int, need_dx: bool):
    out_channels, in_channels, k, _ = weight.shape
    height, width = dy.shape[2], dy.shape[3]
    # im2col as one Conv with a one-hot kernel (each input channel alone), then one batched
    # MatMul: 1.8x faster in ONNX Runtime than k*k shifted slices for the second layer.
    one_hot = torch.eye(k * k, dtype=x.dtype).reshape(k * k, 1, k, k)
    columns = F.conv2d(x.reshape(-1, 1, x.shape[2], x.shape[3]), one_hot, padding=padding)
    columns = columns.reshape(x.shape[0], in_channels * k * k, height * width)
    per_image = torch.bmm(
        dy.reshape(dy.shape[0], out_channels, height * width), columns.transpose(1, 2)
    )
    dw = per_image.sum(0).reshape(weight.shape)
    dx = None
    if need_dx:
        flipped = weight.flip(2, 3).transpose(0, 1)
        dx = F.conv2d(dy, flipped, padding=k - 1 - padding)
    return dx, dw, dy.sum((0, 2, 3))


def _loss_and_gradient(loss: LossSpec, logits: torch.Tensor, target: torch.Tensor):
    """The loss and d loss / d logits, as torch.nn computes them."""
    sum_reduction = loss["reduction"] == "sum"
    if loss.name in ("mse", "l1"):
        diff = logits - target
        value = (diff * diff if loss.name == "mse" else diff.abs()).sum()
        grad = 2 * diff if loss.name == "mse" else torch.sign(diff)
        if sum_reduction:
            return value, grad
        count = diff.numel()
        return value / count, grad / count
    classes = logits.shape[1]
    log_probs = torch.log_softmax(logits, 1)
    probs = torch.exp(log_probs)
    smoothing = loss["label_smoothing"]
    weight = None if loss["weight"] is None else torch.tensor(loss["weight"], dtype=logits.dtype)
    if loss.target == "probabilities":
        if smoothing > 0:
            target = target * (1 - smoothing) + smoothing / classes
        weighted = target if weight is None else target * weight
        value = -(log_probs * weighted).sum()
        grad = probs * weighted.sum(1, keepdim=True) - weighted
        if sum_reduction:
            return value, grad
        return value / logits.shape[0], grad / logits.shape[0]
    ignored = target == loss["ignore_index"]
    safe = torch.where(ignored, torch.zeros_like(target), target)
    one_hot = F.one_hot(safe, classes).to(logits.dtype)
    sample_weight = torch.ones_like(log_probs[:, 0]) if weight is None else weight[safe]
    sample_weight = torch.where(ignored, torch.zeros_like(sample_weight), sample_weight)
    nll = -(log_probs * one_hot).sum(1) * sample_weight
    grad = (probs - one_hot) * sample_weight[:, None] * (1 - smoothing)
    value = nll.sum() * (1 - smoothing)
    if smoothing > 0:
        class_weight = torch.ones_like(log_probs[0]) if weight is None else weight
        kept = (~ignored).to(logits.dtype)[:, None]
        spread = -(log_probs * class_weight).sum(1) * kept[:, 0]
        value = value + spread.sum() * (smoothing / classes)
        grad = grad + (probs * class_weight.sum() - class_weight) * kept * (smoothing / classes)
    if sum_reduction:
        return value, grad
    total = sample_weight.sum()
    # torch leaves ignored rows' gradient at exactly 0, even when nothing is kept (loss NaN)
    return value / total, torch.where(ignored[:, None], torch.zeros_like(grad), grad / total)


class TrainingStep(nn.Module):
    """(images, target, *parameters) -> (loss, logits, d loss / d each parameter[, d loss / d
    images]), with the backward written out layer by layer (see the module docstring)."""

    def __init__(self, model: nn.Module, loss: LossSpec, input_grad: bool = False) -> None:
        super().__init__()
        check_trainable(model, loss)
        self.layers = [layer for _, layer in _layers(model)]
        self.names = [name for name, _ in model.named_parameters()]
        self.loss = loss
        self.input_grad = input_grad

    def forward(self, images, target, *parameters):
        params = iter(parameters)
        saved, x = [], images  # each layer's input and weight (None without one)
        for layer in self.layers:
            weight = next(params) if isinstance(layer, nn.Conv2d | nn.Linear) else None
            saved.append((x, weight))
            if isinstance(layer, nn.Conv2d):
                x = F.conv2d(x, weight, next(params), padding=layer.padding[0])
            elif isinstance(layer, nn.MaxPool2d):
                x = F.max_pool2d(x, 2)
            elif isinstance(layer, nn.Flatten):
                x = x.flatten(1)
            else:
                x = F.linear(x, weight, next(params))
        logits = x
        loss, dy = _loss_and_gradient(self.loss, logits, target)
        grads = []
        for index in range(len(self.layers) - 1, -1, -1):
            layer, (x, weight) = self.layers[index], saved[index]
            if isinstance(layer, nn.Conv2d):
                need_dx = index > 0 or self.input_grad
                dy, dw, db = _conv_backward(dy, x, weight, layer.padding[0], need_dx)
                grads = [dw, db, *grads]
            elif isinstance(layer, nn.MaxPool2d):
                dy = _pool_backward(dy, x, saved[index + 1][0])
            elif isinstance(layer, nn.Flatten):
                dy = dy.reshape(x.shape)
            else:
                grads = [dy.T @ x, dy.sum(0), *grads]
                dy = dy @ weight
        return (loss, logits, *grads, dy) if self.input_grad else (loss, logits, *grads)


class ReferenceTrainingStep(nn.Module):
    """The same outputs from torch.nn's loss and torch.autograd: what a training graph must
    equal."""

    def __init__(self, model: nn.Module, loss: LossSpec, input_grad: bool = False) -> None:
        super().__init__()
        self.model = model
        self.loss = OnLogits(reference_loss(loss), loss)
        self.names = [name for name, _ in model.named_parameters()]
        self.input_grad = input_grad

    def forward(self, images, target, *parameters):
        with torch.enable_grad():
            leaves = [p.detach().clone().requires_grad_() for p in parameters]
            images = images.detach().clone().requires_grad_(self.input_grad)
            logits = torch.func.functional_call(
                self.model, dict(zip(self.names, leaves, strict=True)), (images,)
            )
            loss = self.loss(logits, target)
            wanted = [*leaves, images] if self.input_grad else leaves
            grads = torch.autograd.grad(loss, wanted)
        return (loss.detach(), logits.detach(), *grads)
