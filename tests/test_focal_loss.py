"""The fused focal loss equals torchvision's sigmoid_focal_loss on one-hot targets (value and gradient)."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from sparsedet.layers.focal_loss import binary_labels, fused_sigmoid_focal_loss, reference_sigmoid_focal_loss


def _reference(logits, labels, alpha, gamma, reduction="sum"):
    """torchvision on the one-hot targets of the non-ignored rows (written out here, not imported)."""
    k = logits.shape[1]
    valid = labels >= 0
    onehot = F.one_hot(labels[valid].clamp(max=k), k + 1)[:, :k].to(logits.dtype)
    return sigmoid_focal_loss(logits[valid], onehot, alpha=alpha, gamma=gamma, reduction=reduction)


def _case(rows, classes, seed, ignored=0.1, background=0.8, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=g) * scale - 2.0
    labels = torch.randint(0, classes, (rows,), generator=g)
    u = torch.rand(rows, generator=g)
    labels[u < background] = classes
    labels[u < ignored] = -1
    return logits, labels


def _value_and_grad(fn, logits, labels, *args, dtype=torch.float32):
    x = logits.detach().to(dtype).clone().requires_grad_()
    loss = fn(x, labels, *args)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.25, 1.2), (0.5, 0.0), (-1, 2.0), (1.0, 2.0), (0.0, 1.5)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_equals_torchvision_float32(alpha, gamma, reduction):
    logits, labels = _case(3000, 20, seed=1)
    got, got_grad = _value_and_grad(fused_sigmoid_focal_loss, logits, labels, alpha, gamma, reduction)
    ref, ref_grad = _value_and_grad(_reference, logits, labels, alpha, gamma, reduction)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    scale = ref_grad.abs().max()
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-6, atol=1e-6 * float(scale))
    # Ignored rows get no gradient at all.
    assert (got_grad[labels < 0] == 0).all()


def test_large_level_sum_is_accurate():
    """A P2-sized level (1.6M logits): the sum stays within 1e-6 of a float64 computation."""
    logits, labels = _case(20000, 80, seed=2)
    got = fused_sigmoid_focal_loss(logits, labels)
    exact = _reference(logits.double(), labels, 0.25, 2.0)
    assert got.item() == pytest.approx(exact.item(), rel=1e-6)


def test_all_negative_and_all_ignored_and_empty():
    logits, _ = _case(500, 10, seed=3)
    background = torch.full((500,), 10)
    got, grad = _value_and_grad(fused_sigmoid_focal_loss, logits, background, 0.25, 2.0)
    ref, ref_grad = _value_and_grad(_reference, logits, background, 0.25, 2.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)
    ignored = torch.full((500,), -1)
    got, grad = _value_and_grad(fused_sigmoid_focal_loss, logits, ignored, 0.25, 2.0)
    assert got.item() == 0.0 and (grad == 0).all()
    mean = fused_sigmoid_focal_loss(logits, ignored, reduction="mean")
    assert mean.item() == 0.0
    empty = torch.zeros(0, 10, requires_grad=True)
    loss = fused_sigmoid_focal_loss(empty, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 10)


def test_extreme_logits_are_finite_and_match():
    logits = torch.tensor([[-120.0, 0.0, 30.0], [50.0, -50.0, 15.0], [-15.0, 90.0, 0.5]])
    labels = torch.tensor([0, 3, 2])
    got, grad = _value_and_grad(fused_sigmoid_focal_loss, logits, labels, 0.25, 2.0)
    ref, ref_grad = _value_and_grad(_reference, logits, labels, 0.25, 2.0)
    assert torch.isfinite(got) and torch.isfinite(grad).all()
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_within_its_precision(dtype, tol):
    """Half logits: the loss is computed in fp32 (as the detectors did with ``.float()``), the
    gradient comes back in the logits' dtype; torchvision run in that dtype agrees to its precision."""
    logits, labels = _case(2000, 16, seed=4, scale=2.0)
    got, grad = _value_and_grad(fused_sigmoid_focal_loss, logits, labels, 0.25, 2.0, dtype=dtype)
    ref, ref_grad = _value_and_grad(_reference, logits, labels, 0.25, 2.0, dtype=dtype)
    assert grad.dtype == dtype
    assert got.item() == pytest.approx(ref.float().item(), rel=tol)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol * 5, atol=tol * float(ref_grad.abs().max()))
    # And exact (fp32) against torchvision on the same rounded logits.
    exact, exact_grad = _value_and_grad(_reference, logits.to(dtype).float(), labels, 0.25, 2.0)
    assert got.item() == pytest.approx(exact.item(), rel=1e-6)
    torch.testing.assert_close(grad, exact_grad.to(dtype))


def test_binary_labels_for_query_maps():
    """One-class maps (QueryDet's query loss): labels 0 where the target is 1, 1 (background) elsewhere."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 9, 11, generator=g) * 3
    targets = (torch.rand(2, 9, 11, generator=g) < 0.2).float()
    got, grad = _value_and_grad(lambda x, t, *a: fused_sigmoid_focal_loss(x.reshape(-1, 1), binary_labels(t), *a),
                                logits, targets, 0.25, 1.2, "mean")
    ref, ref_grad = _value_and_grad(lambda x, t, *a: sigmoid_focal_loss(x, t, *a), logits, targets, 0.25, 1.2, "mean")
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)


def test_reference_helper_and_argument_checks():
    logits, labels = _case(200, 5, seed=6)
    assert reference_sigmoid_focal_loss(logits, labels).item() == pytest.approx(
        _reference(logits, labels, 0.25, 2.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="labels"):
        fused_sigmoid_focal_loss(logits, labels[:-1])
    with pytest.raises(ValueError, match="alpha"):
        fused_sigmoid_focal_loss(logits, labels, alpha=2.0)
    with pytest.raises(ValueError, match="reduction"):
        fused_sigmoid_focal_loss(logits, labels, reduction="none")
    with pytest.raises(ValueError, match="logits"):
        fused_sigmoid_focal_loss(logits[None], labels)
