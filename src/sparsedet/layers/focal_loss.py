"""Sigmoid focal loss for dense heads, from class labels, in one fused autograd function.

Dense detectors (RetinaNet, QueryDet, FCOS, TSP-FCOS) classify every anchor or point of every
level: at P2 with 80 classes that is tens of millions of logits per batch, almost all of them
background. ``torchvision.ops.sigmoid_focal_loss`` on a one-hot target spends a training step in
a dozen element-wise passes over that matrix (sigmoid, BCE, p_t, (1 - p_t)^gamma, alpha_t, ...),
keeps most of their results for autograd, and the caller first builds an int64 one-hot matrix and
copies the non-ignored rows out. :func:`fused_sigmoid_focal_loss` computes exactly the same sum
(and gradient) with:

* no one-hot matrix and no row copy: the targets are the class labels, ignored rows are zeroed in
  place (a few rows), positives are the few (row, class) entries the labels name;
* the negatives' term ``(1 - alpha) * p^gamma * softplus(x)`` over the whole matrix, positive
  entries excluded, summed with one dot product; the positives' term ``alpha * (1 - p)^gamma *
  softplus(-x)`` on the positive entries only;
* the gradient computed in the same forward pass, in place, as the one full-size tensor kept for
  backward (backward is a single scale by the incoming gradient): 8 full-size passes forward
  (sigmoid, softplus, power, two scalings, product, sum, lerp) and 1 backward, 3 full-size
  buffers at the peak, where the reference runs a dozen passes forward, as many backward, and
  keeps their intermediates for autograd.

Derivatives (p = sigmoid(x), q = 1 - p):
    d/dx [(1 - alpha) p^gamma softplus(x)]  = (1 - alpha) p^gamma (gamma q softplus(x) + p)
    d/dx [alpha q^gamma softplus(-x)]       = -alpha q^gamma (gamma p softplus(-x) + q)

:func:`reference_sigmoid_focal_loss` is the same interface on top of torchvision's function (what
the detectors called before); the tests compare the two, and ``benchmarks/focal_loss_step.py``
uses it as the "before" of its timing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

__all__ = ["fused_sigmoid_focal_loss", "reference_sigmoid_focal_loss", "binary_labels"]

_REDUCTIONS = ("sum", "mean")


def _check(logits: Tensor, labels: Tensor, alpha: float, reduction: str) -> None:
    if logits.dim() < 2:
        raise ValueError(f"logits must be (R, K) or (..., K), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integers of the logits' leading shape {tuple(logits.shape[:-1])} "
                         f"(logits {tuple(logits.shape)}), got {tuple(labels.shape)} {labels.dtype}")
    if not (0.0 <= alpha <= 1.0) and alpha != -1:
        raise ValueError(f"alpha must lie in [0, 1] or be -1 (no weighting), got {alpha}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _class_weights(alpha: float) -> tuple[float, float]:
    """(positive weight, negative weight): (alpha, 1 - alpha), or (1, 1) for alpha = -1."""
    return (1.0, 1.0) if alpha < 0 else (float(alpha), 1.0 - float(alpha))


def _is_dense(t: Tensor) -> bool:
    """True when ``t`` covers one gap-free block of memory in some dimension order (a contiguous
    tensor or a permutation of one, e.g. a conv output viewed anchors/classes last)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _flat(t: Tensor) -> Tensor:
    """The 1-D view of a dense tensor's memory block (``t.view(-1)`` when contiguous). Every
    full-size tensor of the loss has the logits' strides, so one set of offsets indexes them all."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _entry_offsets(x: Tensor, rows: Tensor, classes: Tensor) -> Tensor:
    """Memory offsets in ``_flat(x)`` of entries (row, class); rows count the leading dims in C
    order. For (R, K) contiguous logits: ``row * K + class``."""
    if x.dim() == 2 and x.is_contiguous():
        return rows * x.shape[1] + classes
    offsets = classes * x.stride(-1)
    for size, stride in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        offsets = offsets + (rows % size) * stride
        rows = torch.div(rows, size, rounding_mode="floor")
    return offsets


class _FusedFocalLossSum(torch.autograd.Function):
    """Sum of the focal loss over the non-ignored rows; see the module docstring."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
        num_classes = logits.shape[-1]
        x = logits.detach().float()
        if x.dim() == 2 or not _is_dense(x):
            x = x.contiguous()                             # no copy for contiguous fp32 logits
        w_pos, w_neg = _class_weights(alpha)
        labels = labels.reshape(-1).long()                 # rows in C order of the leading dims
        ignored_rows = (labels < 0).nonzero().squeeze(1)
        positive_rows = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
        positive_entries = _entry_offsets(x, positive_rows, labels[positive_rows])  # flat (row, class)

        p = torch.sigmoid(x)                               # element-wise results keep x's layout,
        softplus = F.softplus(x)                           # -log(1 - p), stable for large x
        # w_neg * p^gamma; entries outside the negatives' term (ignored rows, the positive entries)
        # get 0 there, so their negative loss and gradient vanish.
        modulation = p.square() if gamma == 2.0 else p.pow(gamma)
        if x.dim() == 2:
            modulation.index_fill_(0, ignored_rows, 0.0)
        else:
            every_class = torch.arange(num_classes, device=x.device)
            _flat(modulation).index_fill_(0, _entry_offsets(x, ignored_rows[:, None], every_class).reshape(-1), 0.0)
        _flat(modulation).index_fill_(0, positive_entries, 0.0)
        modulation.mul_(w_neg)
        elementwise = softplus.mul_(modulation)            # the negatives' loss, in the softplus buffer
        negatives = elementwise.sum()                      # cascade sum: as accurate as torchvision's

        x_pos = _flat(x).index_select(0, positive_entries)
        q_pos = torch.sigmoid(-x_pos)                      # 1 - p, exact for large logits
        softplus_neg_pos = F.softplus(-x_pos)              # -log(p)
        q_pos_mod = q_pos.square() if gamma == 2.0 else q_pos.pow(gamma)
        positives = (q_pos_mod * softplus_neg_pos).sum() * w_pos
        loss = negatives + positives

        if ctx.needs_input_grad[0]:
            # grad = w_neg p^g (g q softplus + p), in place: with a = g * elementwise,
            # lerp(a, modulation, p) = a (1 - p) + p * w_neg p^g.
            grad = elementwise.mul_(gamma)
            grad.lerp_(modulation, p)
            p_pos = torch.sigmoid(x_pos)
            grad_pos = -w_pos * q_pos_mod * (gamma * p_pos * softplus_neg_pos + q_pos)
            _flat(grad).index_copy_(0, positive_entries, grad_pos)
            ctx.save_for_backward(grad)
            ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.logits_dtype), None, None, None


def fused_sigmoid_focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                             reduction: str = "sum") -> Tensor:
    """Sigmoid focal loss of (R, K) logits against class labels; same value and gradient as
    ``torchvision.ops.sigmoid_focal_loss`` on the one-hot targets of the non-ignored rows.

    Args:
        logits: (R, K) class logits, any float dtype (computed in fp32, gradient in logits' dtype);
            or (..., K) with labels (...): e.g. a dense head's (B, H, W, A, K) permuted view of its
            (B, A * K, H, W) conv output, used in place (no copy to rows, and a gradient in the
            conv's own layout: no copy in backward either).
        labels: (R,) integer labels: ``k`` in [0, K) = foreground of class k (target 1 at column k,
            0 elsewhere), ``>= K`` = background (all targets 0), ``< 0`` = ignored row (no loss, zero
            gradient). One-class binary maps: see :func:`binary_labels`.
        alpha: weight of the positive entries (negatives get 1 - alpha); -1 = no weighting.
        gamma: focusing exponent (>= 0).
        reduction: ``sum``, or ``mean`` = sum / (non-ignored rows * K) (torchvision's mean over the
            rows it was given).

    Returns:
        fp32 scalar.
    """
    _check(logits, labels, alpha, reduction)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    total = _FusedFocalLossSum.apply(logits, labels, float(alpha), float(gamma))
    if reduction == "mean":
        count = (labels >= 0).sum() * logits.shape[-1]
        total = total / count.clamp(min=1)
    return total


def reference_sigmoid_focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                                 reduction: str = "sum") -> Tensor:
    """Same interface as :func:`fused_sigmoid_focal_loss`, computed the straightforward way: drop the
    ignored rows, one-hot the labels (background = all zeros), ``torchvision.ops.sigmoid_focal_loss``
    in fp32. Slow and memory-hungry; kept as the reference for tests and benchmarks."""
    _check(logits, labels, alpha, reduction)
    num_classes = logits.shape[-1]
    valid = labels >= 0
    onehot = F.one_hot(labels[valid].long().clamp(max=num_classes), num_classes + 1)[:, :num_classes]
    return sigmoid_focal_loss(logits[valid].float(), onehot.float(), alpha=alpha, gamma=gamma, reduction=reduction)


def binary_labels(targets: Tensor) -> Tensor:
    """0/1 targets of any shape -> (numel,) labels for one-class (K = 1) logits ``x.reshape(-1, 1)``:
    0 (= class 0, target 1) where the target is 1, 1 (= background) where it is 0."""
    return (targets.reshape(-1) <= 0.5).long()
