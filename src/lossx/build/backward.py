"""Training graphs: the loss, the logits, every parameter's gradient and the buffers a train-mode
step leaves, for any model, in standard ONNX ops.

The step is found from the model's real computation: make_fx traces the train-mode forward,
the loss and torch.autograd.grad into one graph of ATen ops (symbolic in the batch size), with
torch's decompositions turning the backward ops into forward ops that torch.onnx exports:
batch-norm, threshold, activations, softmax, the losses and general max-pooling have torch's
own; convolution, average pooling and the common 2x2 max-pooling get lossx's below. The
batch-norm *forward* is decomposed into reductions too: reaching ONNX as BatchNormalization it
would run in inference mode in ONNX Runtime, silently. `check_traced` refuses what would still
not export (an ATen backward without a decomposition, a random op) by name.

Every training graph is checked against torch.autograd (ReferenceTrainingStep) in train mode
before it lands.
"""

import copy
import functools
import math
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch._decomp import core_aten_decompositions, get_decompositions
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.nn.attention import SDPBackend, sdpa_kernel

from lossx.build.losses import OnLogits, reference_loss
from lossx.build.models import user_code_in_traceback
from lossx.errors import ExportError, SpecError, first_line
from lossx.runtime.graphs import Buffer, GraphSpec
from lossx.runtime.loss_specs import LossSpec

aten = torch.ops.aten
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def check_trainable(model: nn.Module, loss: LossSpec) -> None:
    """Refuse, before any tracing, what a training graph cannot hold, naming it."""
    if loss["reduction"] == "none":
        raise SpecError(f"--train: {loss} has no scalar loss to differentiate; use mean or sum")
    if not any(True for _ in model.parameters()):
        raise SpecError("--train: the model has no parameters, so there is nothing to train")
    for name, module in model.named_modules():
        if isinstance(module, _DROPOUT) and module.p > 0:
            raise SpecError(
                f"--train: {name} ({module}) needs random masks, which standard ONNX cannot "
                "draw reproducibly; training graphs refuse Dropout (set p=0 or remove it)"
            )


# --- decompositions of the backward ops torch has none for, in forward ops -----------------


def _pairs(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value) * (2 // len(value))


def _conv_weight_grad(dy, x, weight_shape, stride, padding, dilation, groups):
    """The weight gradient in the form ONNX Runtime ran fastest (docs/training.md, Speed): for
    ungrouped stride-1 convolutions, `_shifted_rows_weight_grad`; otherwise im2col as one Conv
    with a one-hot kernel (each input channel alone), then one batched MatMul per group (1.8x
    faster than k*k shifted slices)."""
    out_channels, in_per_group, kh, kw = weight_shape
    height, width = dy.shape[2], dy.shape[3]
    if groups == 1 and stride == (1, 1) and dilation == (1, 1) and (kh, kw) != (1, 1):
        return _shifted_rows_weight_grad(dy, x, kh, kw, padding)
    if (kh, kw) == (1, 1) and padding == (0, 0):
        columns = x[:, :, :: stride[0], :: stride[1]]
    else:
        one_hot = torch.eye(kh * kw, dtype=x.dtype).reshape(kh * kw, 1, kh, kw)
        columns = F.conv2d(
            x.reshape(-1, 1, x.shape[2], x.shape[3]), one_hot, None, stride, padding, dilation
        )
    # one bmm over (image, group) pairs, its transpose fused into ONNX Runtime's MatMul (a 4-D
    # matmul made the transpose a copy: 0.82x the speed)
    columns = columns.reshape(-1, in_per_group * kh * kw, height * width)
    dy = dy.reshape(-1, out_channels // groups, height * width)
    per_image = torch.bmm(dy, columns.transpose(1, 2))
    return per_image.reshape(-1, *weight_shape).sum(0)


def _shifted_rows_weight_grad(dy, x, kh, kw, padding):
    """dW[o, c, i, j] = sum over images n and positions (y, x) of dy[n, o, y, x] times
    x_padded[n, c, y + i, x + j], for stride 1: the kw column shifts of the images as one 1 x kw
    one-hot Conv (kw copies of the images where an im2col writes kh * kw), the kh row shifts of
    dy as one kh x 1 one-hot Conv, then one batched MatMul over images."""
    out_channels, height, width = dy.shape[1], dy.shape[2], dy.shape[3]
    in_channels = x.shape[1]
    column_shifts = torch.eye(kw, dtype=x.dtype).reshape(kw, 1, 1, kw)
    columns = F.conv2d(x.reshape(-1, 1, x.shape[2], x.shape[3]), column_shifts, None, 1, padding)
    rows = columns.shape[2]  # the padded height: height + kh - 1
    columns = columns.reshape(-1, in_channels * kw, rows * width)
    row_shifts = torch.eye(kh, dtype=dy.dtype).flip(1).reshape(kh, 1, kh, 1)
    shifted = F.conv2d(dy.reshape(-1, 1, height, width), row_shifts, None, 1, (kh - 1, 0))
    shifted = shifted.reshape(-1, out_channels * kh, rows * width)
    per_image = torch.bmm(shifted, columns.transpose(1, 2))
    summed = per_image.reshape(-1, out_channels, kh, in_channels, kw).sum(0)
    return summed.permute(0, 2, 1, 3)


def _conv_input_grad(dy, x_shape, weight, stride, padding, dilation, groups):
    kh, kw = weight.shape[2], weight.shape[3]
    flipped_padding = [d * (k - 1) - p for d, k, p in zip(dilation, (kh, kw), padding, strict=True)]
    if stride == (1, 1) and groups == 1 and min(flipped_padding) >= 0:
        # a Conv of dy with the flipped, transposed kernel: faster than ConvTranspose here
        flipped = weight.flip(2, 3).transpose(0, 1)
        return F.conv2d(dy, flipped, None, 1, flipped_padding, dilation)
    output_padding = [
        size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
        for size, out, s, p, d, k in zip(
            x_shape[2:], dy.shape[2:], stride, padding, dilation, (kh, kw), strict=True
        )
    ]
    return F.conv_transpose2d(dy, weight, None, stride, padding, output_padding, groups, dilation)


def _convolution_backward(
    dy, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask
):
    if transposed or weight.dim() != 4:
        return NotImplemented
    stride, padding, dilation = _pairs(stride), _pairs(padding), _pairs(dilation)
    dx = _conv_input_grad(dy, x.shape, weight, stride, padding, dilation, groups)
    dw = _conv_weight_grad(dy, x, weight.shape, stride, padding, dilation, groups)
    return (
        dx if mask[0] else None,
        dw if mask[1] else None,
        dy.sum((0, 2, 3)) if mask[2] else None,
    )


def _spread(dy, x_shape, kernel, stride, padding):
    """Each output's gradient copied back over its pooling window (summed where windows
    overlap): nearest-neighbour upsampling for tiling windows, else a ConvTranspose."""
    channels, height, width = x_shape[1], x_shape[2], x_shape[3]
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    out_h, out_w = dy.shape[2], dy.shape[3]
    if (kh, kw) == (sh, sw) and (ph, pw) == (0, 0) and (out_h * kh, out_w * kw) == (height, width):
        tiles = dy[:, :, :, None, :, None].expand(-1, -1, -1, kh, -1, kw)
        return tiles.reshape(-1, channels, height, width)
    ones = torch.ones(1, 1, kh, kw, dtype=dy.dtype)
    output_padding = (
        height - ((out_h - 1) * sh - 2 * ph + kh),
        width - ((out_w - 1) * sw - 2 * pw + kw),
    )
    planes = dy.reshape(-1, 1, out_h, out_w)
    spread = F.conv_transpose2d(planes, ones, None, (sh, sw), (ph, pw), output_padding)
    return spread.reshape(-1, channels, height, width)


def _window_counts(out: int, size: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """How many of each window's `kernel` positions along one axis fall inside the image.
    (Built from ops: ONNX's AveragePool has no divisor_override to count them with.)"""
    start = torch.arange(out) * stride - padding
    return (start + kernel).clamp(max=size) - start.clamp(min=0)


def _avg_pool2d_backward(
    dy, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    if ceil_mode or x.dim() != 4:
        return NotImplemented
    kernel = _pairs(kernel_size)
    stride, padding = _pairs(stride or kernel_size), _pairs(padding)
    if divisor_override:
        divisor = divisor_override
    elif count_include_pad or padding == (0, 0):
        divisor = kernel[0] * kernel[1]
    else:  # the count of in-image elements under each window, a constant
        axes = zip(x.shape[2:], dy.shape[2:], kernel, stride, padding, strict=True)
        rows, columns = (_window_counts(out, size, k, s, p) for size, out, k, s, p in axes)
        divisor = (rows[:, None] * columns[None, :]).to(dy.dtype)
    return _spread(dy / divisor, x.shape, kernel, stride, padding)


def _adaptive_avg_pool2d_backward(dy, x):
    height, width = x.shape[2], x.shape[3]
    out_h, out_w = dy.shape[2], dy.shape[3]
    if x.dim() != 4 or height % out_h or width % out_w:
        return NotImplemented  # uneven windows
    kernel = (height // out_h, width // out_w)
    return _spread(dy / (kernel[0] * kernel[1]), x.shape, kernel, kernel, (0, 0))


def _max_pool2d_backward(dy, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """dy goes to the first maximum of each window in row-major order, as torch's indices say,
    found by comparisons: ONNX Runtime's MaxPool indices may break ties (flat image regions
    give them) otherwise. 2x2 windows of stride 2 interleave the four masked copies; other
    windows place each window offset's masked copy with a one-hot ConvTranspose (col2im)."""
    kernel, stride = _pairs(kernel_size), _pairs(stride or kernel_size)
    padding, dilation = _pairs(padding), _pairs(dilation)
    if ceil_mode or dilation != (1, 1) or x.dim() != 4:
        return _TORCH_DECOMPOSITIONS[aten.max_pool2d_with_indices_backward.default](
            dy, x, kernel_size, stride, padding, dilation, ceil_mode, indices
        )
    tiled = kernel == stride == (2, 2) and padding == (0, 0)
    if tiled and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0:
        return _tiled_max_pool2d_backward(dy, x)
    y = F.max_pool2d(x, kernel, stride, padding)
    out_h, out_w = y.shape[2], y.shape[3]
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=-math.inf)
    taken = torch.zeros_like(y, dtype=torch.bool)
    parts = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            window = padded[:, :, i : i + stride[0] * (out_h - 1) + 1 : stride[0],
                            j : j + stride[1] * (out_w - 1) + 1 : stride[1]]  # fmt: skip
            first = (window == y) & ~taken
            taken = taken | first
            parts.append(dy * first.to(dy.dtype))  # a 0/1 mask, as in the tiled case
    planes = torch.stack(parts, 2).reshape(-1, kernel[0] * kernel[1], out_h, out_w)
    one_hot = torch.eye(kernel[0] * kernel[1], dtype=dy.dtype).reshape(-1, 1, *kernel)
    height, width = x.shape[2], x.shape[3]
    extra = (
        height - ((out_h - 1) * stride[0] - 2 * padding[0] + kernel[0]),
        width - ((out_w - 1) * stride[1] - 2 * padding[1] + kernel[1]),
    )
    spread = F.conv_transpose2d(planes, one_hot, None, stride, padding, extra)
    return spread.reshape(x.shape)


def _tiled_max_pool2d_backward(dy, x):
    y = F.max_pool2d(x, 2)
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


def _threshold_backward(dy, x, threshold):
    """ReLU's backward as a Mul by a 0/1 mask: with torch's Where, resnet20's step took 1.1x as
    long in ONNX Runtime. (It differs from torch's only where x is NaN or dy infinite.)"""
    return dy * (x > threshold).to(dy.dtype)


def _channel_sums(x):
    """The sum of `x` per channel (dim 1): float32 over each image's map, then float64 over the
    batch. As near the exact sum as float64 throughout (within 0.61 of float32's last place
    against 0.49, measured to 256x16x32x32), at float32's speed (float64 throughout: resnet20's
    step 9-18% slower in one unpaired run); float32 throughout was 2.1-9.4 last places off."""
    per_image = x.sum(list(range(2, x.dim()))) if x.dim() > 2 else x
    return per_image.to(torch.float64).sum(0)


def _batch_norm_statistics(x, eps):
    """The biased variance, the mean and 1/sqrt(variance + eps) of `x` per channel: float64
    [C] (sums as _channel_sums)."""
    # the count is symbolic in the batch size: a float64 tensor, or ONNX gets a float32 one
    count = torch.scalar_tensor(x.numel() // x.shape[1], dtype=torch.float64)
    mean = _channel_sums(x) / count
    centred = x - _channels(mean.to(x.dtype), x)
    var = _channel_sums(centred * centred) / count
    return var, mean, torch.rsqrt(var + eps)


def _channels(t, like):
    return t.reshape(1, -1, *[1] * (like.dim() - 2))


def _batch_norm(op, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """Batch norm `op` in train mode with its statistics summed as torch's CPU kernel sums them,
    near the exact value (_channel_sums: with float32 sums, ONNX Runtime's new running means
    were 2.9 times as far from float64 as torch's); in eval mode as torch decomposes it."""
    if not training:
        return _TORCH_DECOMPOSITIONS[op](
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
    var, mean, rstd = _batch_norm_statistics(x, eps)
    # x * scale + shift, as torch's kernel computes it: two roundings per element
    scale = rstd if weight is None else rstd * weight.to(torch.float64)
    shift = -mean * scale if bias is None else bias.to(torch.float64) - mean * scale
    out = x * _channels(scale.to(x.dtype), x) + _channels(shift.to(x.dtype), x)
    var, mean, rstd = var.to(x.dtype), mean.to(x.dtype), rstd.to(x.dtype)
    if running_mean is not None:
        count = x.numel() // x.shape[1]  # symbolic in the batch size: its ratio is a float
        running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
        running_var.copy_(momentum * var * (count / (count - 1)) + (1 - momentum) * running_var)
    return out, mean, rstd


def _batch_norm_backward(dy, x, weight, running_mean, running_var, mean, rstd, train, eps, mask):
    """A train-mode batch norm's backward with its two sums as the forward's (_channel_sums)."""
    if not train:
        return _TORCH_DECOMPOSITIONS[aten.native_batch_norm_backward.default](
            dy, x, weight, running_mean, running_var, mean, rstd, train, eps, mask
        )
    count = x.numel() // x.shape[1]  # symbolic, a float
    centred = x - _channels(mean, x)
    dy_sum = _channel_sums(dy).to(x.dtype)
    dot = _channel_sums(dy * centred).to(x.dtype)
    scale = rstd if weight is None else rstd * weight
    projection = _channels(dot / count * rstd * rstd, x)
    dx = (dy - centred * projection - _channels(dy_sum / count, x)) * _channels(scale, x)
    return dx, dot * rstd if mask[1] else None, dy_sum if mask[2] else None


_TORCH_DECOMPOSITIONS = get_decompositions(
    [
        aten._native_batch_norm_legit,
        aten._native_batch_norm_legit_functional,
        aten._native_batch_norm_legit_no_training,
        aten.native_batch_norm,
        aten.native_batch_norm_backward,
        aten.max_pool2d_with_indices_backward,
    ]
)


@functools.cache
def decompositions() -> dict:
    """torch's core ATen decompositions, its batch-norm forward ones, and lossx's backward ones."""
    table = {**core_aten_decompositions(), **_TORCH_DECOMPOSITIONS}
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    table[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_backward
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool2d_backward
    table[aten.threshold_backward.default] = _threshold_backward
    for op in (aten.native_batch_norm.default, aten._native_batch_norm_legit.default):
        table[op] = functools.partial(_batch_norm, op)
    table[aten.native_batch_norm_backward.default] = _batch_norm_backward
    return table


# --- the step: traced, checked, and its reference ---------------------------------------------


def frozen_batch_norms(model: nn.Module, frozen: frozenset[str], frozen_bn: str) -> list[str]:
    """The batch-norm layers (module names) that run in eval mode in a training step: with
    `frozen_bn` "eval", those whose parameters are all in `frozen` (a layer without affine
    parameters follows the batch)."""
    if frozen_bn != "eval":
        return []
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and any(True for _ in module.parameters(recurse=False))
        and all(f"{name}.{p}" in frozen for p, _ in module.named_parameters(recurse=False))
    ]


def eval_batch_norms(model: nn.Module, spec: GraphSpec) -> list[nn.Module]:
    """The batch-norm layers training graph `spec` runs in eval mode: those whose buffers it
    takes but none of which it updates (in train mode a step always counts the batch in
    num_batches_tracked, even at momentum 0)."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            buffers = [f"{name}.{b}" for b, _ in module.named_buffers(recurse=False)]
            taken = [b for b in buffers if b in spec.buffer_names]
            if taken and not any(b in spec.next_buffers for b in taken):
                layers.append(module)
    return layers


def train_mode(model: nn.Module, eval_modules: list[nn.Module]) -> None:
    """`model` in train mode but for `eval_modules`."""
    model.train()
    for module in eval_modules:
        module.eval()


def model_buffers(
    model: nn.Module, image_shape: tuple[int, ...], eval_modules: list[str] = ()
) -> tuple[Buffer, ...]:
    """Every buffer of `model` (which takes images of `image_shape`, C,H,W) as its training
    graphs take it, the modules named in `eval_modules` in eval mode, refusing dtypes they
    cannot."""
    updated = updated_buffers(model, image_shape, eval_modules)
    buffers = []
    for name, value in model.named_buffers():
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in ("float32", "int64"):
            raise SpecError(
                f"--train: buffer {name} is {dtype}; training graphs take float32 or int64"
            )
        buffers.append(Buffer(name, dtype, tuple(value.shape), name in updated))
    return tuple(buffers)


def updated_buffers(
    model: nn.Module, image_shape: tuple[int, ...], eval_modules: list[str] = ()
) -> list[str]:
    """The buffers a train-mode forward (the modules named in `eval_modules` in eval mode)
    changes (batch-norm statistics), by state_dict name."""
    probe = copy.deepcopy(model)
    modules = dict(probe.named_modules())
    train_mode(probe, [modules[name] for name in eval_modules])
    before = {k: v.clone() for k, v in probe.named_buffers()}
    with torch.no_grad():
        probe(torch.rand(2, *image_shape))
    after = dict(probe.named_buffers())
    return [k for k, v in before.items() if not torch.equal(v, after[k])]


def _functional_step(model: nn.Module, spec: GraphSpec, loss_fn: nn.Module):
    """Training graph `spec` as a function: (images, target, *parameters, *buffers) -> (loss,
    logits, *gradients of the parameters it trains, *next buffers), the model in train mode
    (its batch norms whose statistics the spec keeps fixed in eval mode) on copies of the
    buffers, scored by `loss_fn` (an OnLogits)."""
    trained, buffer_names = set(spec.parameter_names), set(spec.buffer_names)
    updated, input_grad = list(spec.next_buffers), spec.input_grad
    eval_modules = eval_batch_norms(model, spec)

    def step(images, target, *tensors):
        with torch.enable_grad():
            state, leaves = {}, []
            for name, tensor in zip(spec.state_names, tensors, strict=True):
                if name in trained:
                    tensor = tensor.detach().requires_grad_()
                    leaves.append(tensor)
                elif name in buffer_names:
                    tensor = tensor.clone()  # a train-mode step changes it in place
                state[name] = tensor
            images = images.detach().requires_grad_(input_grad)
            modes = {module: module.training for module in model.modules()}
            train_mode(model, eval_modules)
            try:
                logits = torch.func.functional_call(model, state, (images,))
            finally:
                for module, mode in modes.items():
                    module.training = mode
            loss = loss_fn(logits, target)
            wanted = [*leaves, images] if input_grad else leaves
            grads = torch.autograd.grad(loss, wanted)
        return (loss.detach(), logits.detach(), *grads, *(state[k] for k in updated))

    return step


class ReferenceTrainingStep(nn.Module):
    """What training graph `spec` must equal: torch.nn's loss and torch.autograd, the model in
    train mode. forward(images, target, *parameters, *buffers) -> (loss, logits, *gradients[,
    d loss / d images], *next buffers)."""

    def __init__(self, model: nn.Module, spec: GraphSpec) -> None:
        super().__init__()
        self.model = model
        self.loss = OnLogits(reference_loss(spec.loss), spec.loss)  # a submodule: .double() too
        self.step = _functional_step(model, spec, self.loss)

    def forward(self, images, target, *tensors):
        return tuple(t.detach() for t in self.step(images, target, *tensors))


class TrainingStep(nn.Module):
    """The module training graph `spec` is exported from: the reference step traced by make_fx
    with lossx's decompositions (see the module docstring), so only forward ops remain."""

    def __init__(self, model: nn.Module, spec: GraphSpec) -> None:
        super().__init__()
        check_trainable(model, spec.loss)
        tensors = [p.detach() for p in model.parameters()] + [b.detach() for b in model.buffers()]
        args = _symbolic_batch(_example(spec), tensors)
        step = _functional_step(model, spec, OnLogits(reference_loss(spec.loss), spec.loss))
        try:
            # attention through its math path: the fused kernels' backward ops have no ONNX form
            with sdpa_kernel(SDPBackend.MATH):
                self.traced = make_fx(step, decompositions(), tracing_mode="symbolic")(*args)
        except Exception as e:  # the user's model may raise anything while it is traced
            raise in_place_refusal(e, model, spec.image_shape) or ExportError(
                f"{spec.file}: tracing the train-mode step failed: {first_line(e)}"
            ) from None
        check_traced(self.traced, model)

    def forward(self, images, target, *tensors):
        return self.traced(images, target, *tensors)


def in_place_refusal(
    error: Exception, model: nn.Module, image_shape: tuple[int, ...], context: str = "--train"
) -> SpecError | None:
    """A one-line refusal (after `context`) for autograd's "modified by an inplace operation",
    naming what was changed and, from a rerun under torch's anomaly mode, where the model made
    it; None for any other error."""
    text = str(error)
    if "modified by an inplace operation" not in text:
        return None
    made = re.search(r"which is (output \d+ of \w+)", text)
    where = _forward_site(model, image_shape)
    return SpecError(
        f"{context}: the model changes {made.group(1) if made else 'a tensor'}"
        f"{f' (made at {where})' if where else ''} in place, but its gradient needs it as it "
        "was; write that step out of place (y = y * 2, not y.mul_(2); F.relu(y), not y.relu_())"
    )


def _forward_site(model: nn.Module, image_shape: tuple[int, ...]) -> str | None:
    """Where the model's forward made the tensor that an in-place op then changed: a
    train-mode step of a copy under torch.autograd.detect_anomaly, which records the forward
    stack of each op."""
    probe = copy.deepcopy(model).train()
    with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly():
        warnings.simplefilter("always")
        try:
            logits = probe(torch.rand(2, *image_shape))
            torch.autograd.grad(logits.float().sum(), list(probe.parameters()))
        except RuntimeError:
            pass
    texts = [str(w.message) for w in caught if "forward call that caused" in str(w.message)]
    return user_code_in_traceback(texts[-1]) if texts else None


def _symbolic_batch(batch: tuple[torch.Tensor, ...], weights: list[torch.Tensor]) -> list:
    """Fake tensors to trace with, symbolic in the batch dim only (make_fx's symbolic mode
    makes every dim symbolic, and tracing the reshapes of a convolution's backward then takes
    minutes)."""
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)  # loss weights

    def fake(tensor: torch.Tensor, index: int, batched: bool) -> torch.Tensor:
        sizes = [DimDynamic.STATIC] * tensor.dim()
        if batched:
            sizes[0] = DimDynamic.DYNAMIC
        return mode.from_tensor(
            tensor,
            source=ConstantSource(f"input{index}"),
            symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes),
        )

    tensors = [*batch, *weights]
    return [fake(t, i, i < len(batch)) for i, t in enumerate(tensors)]


def _example(spec: GraphSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 4 to trace training graph `spec` with: images, and targets in its form."""
    images = torch.rand(4, *spec.image_shape)
    classes = spec.class_dim()
    if spec.loss.target == "class_index":
        return images, torch.arange(4) % classes
    return images, torch.softmax(torch.rand(4, classes), 1)


def check_traced(graph: torch.fx.GraphModule, model: nn.Module) -> None:
    """Refuse a traced step holding an op torch.onnx cannot export as a training step: a
    backward op no decomposition covers, or a random op, naming the op and the layers that
    use its forward."""
    for node in graph.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = node.target.name().split("::")[-1].split(".")[0]
        if torch.Tag.nondeterministic_seeded in node.target.tags:
            raise SpecError(
                f"--train: {model.__class__.__name__} calls the random op aten.{name} in train "
                "mode (functional dropout?); standard ONNX cannot draw it reproducibly"
            )
        if name.endswith("_backward"):
            raise SpecError(
                f"--train: no ONNX backward for aten.{name} (used by {_users_of(model, name)})"
            )


def _users_of(model: nn.Module, backward: str) -> str:
    """The layers whose forward the backward op `backward` belongs to, best effort."""
    forward = backward.removesuffix("_backward").lstrip("_").replace("_", "")
    found = [
        f"{n or 'the model'} ({type(m).__name__})"
        for n, m in model.named_modules()
        if not list(m.children()) and type(m).__name__.lower() == forward
    ]
    return ", ".join(found[:3]) or f"a function in the forward of {model.__class__.__name__}"
