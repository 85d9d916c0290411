"""The fused focal loss on a dense head's (B, H, W, A, K) view: same loss and gradient as on rows,
gradient in the conv output's own layout (no copy in backward)."""
from __future__ import annotations

import pytest
import torch

from sparsedet.layers.focal_loss import fused_sigmoid_focal_loss, reference_sigmoid_focal_loss

pytestmark = pytest.mark.usefixtures("single_thread")


def conv_output_and_labels(seed: int, b=2, a=3, k=7, h=5, w=6):
    g = torch.Generator().manual_seed(seed)
    raw = (torch.randn(b, a * k, h, w, generator=g) * 3).requires_grad_(True)     # a conv's output
    labels = torch.randint(-1, k + 1, (b, h, w, a), generator=g)                  # ignored, fg, bg
    labels[0] = -1 if seed % 2 else k                                             # all ignored / all bg
    view = raw.view(b, a, k, h, w).permute(0, 3, 4, 1, 2)                        # (B, H, W, A, K), no copy
    return raw, view, labels


@pytest.mark.parametrize("seed, gamma, reduction", [(0, 2.0, "sum"), (1, 1.2, "sum"), (2, 2.0, "mean"), (3, 0.0, "sum")])
def test_layout_view_equals_rows_and_reference(seed, gamma, reduction):
    raw, view, labels = conv_output_and_labels(seed)
    k = view.shape[-1]
    loss = fused_sigmoid_focal_loss(view, labels, 0.25, gamma, reduction)
    grad, = torch.autograd.grad(loss, raw)
    rows = view.reshape(-1, k)                                                     # the former copy to rows
    loss_rows = fused_sigmoid_focal_loss(rows, labels.reshape(-1), 0.25, gamma, reduction)
    grad_rows, = torch.autograd.grad(loss_rows, raw)
    reference = reference_sigmoid_focal_loss(rows, labels.reshape(-1), 0.25, gamma, reduction)
    grad_ref, = torch.autograd.grad(reference, raw)
    torch.testing.assert_close(loss, loss_rows, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    # Element-wise the same formula; only the CPU kernels' vector/scalar tails fall on other entries.
    torch.testing.assert_close(grad, grad_rows, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)
    assert grad.is_contiguous()


def test_non_dense_view_falls_back_to_a_copy():
    raw, view, labels = conv_output_and_labels(4)
    sliced = view[:, ::2]                                  # strided: not one block of memory
    loss = fused_sigmoid_focal_loss(sliced, labels[:, ::2])
    expected = reference_sigmoid_focal_loss(sliced.reshape(-1, sliced.shape[-1]), labels[:, ::2].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    grad, = torch.autograd.grad(loss, raw)
    assert grad[:, :, 1::2].abs().sum() == 0 and grad[:, :, ::2].abs().sum() > 0   # raw (B, A*K, H, W)
