"""Triton kernels (run by the Triton interpreter on CPU tensors) against their pure-torch reference twins.

Every output buffer the ops allocate starts as NaN (ops.POISON_OUTPUTS), so an element a kernel fails to write
fails the comparison. Inputs are fresh random tensors each run. Pure copies must be bit-exact; where arithmetic
enters, the tolerance and its reason are stated next to the assertion.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastsupmae.kernels import dispatch, ops
from fastsupmae.kernels import reference as ref

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])

# (B, C, p, grid (GH, GW), K kept): N = 256 with p 16, N = 196 with p 14, batch 1, 1 and 3 channels, a
# non-square grid, K not a multiple of any block size, and P = p*p*C never a power of two except 1x16x16.
CASES = [
    pytest.param(1, 3, 16, (16, 16), 64, id="B1-C3-p16-N256"),
    pytest.param(2, 1, 14, (14, 14), 49, id="B2-C1-p14-N196"),
    pytest.param(3, 3, 14, (14, 14), 37, id="B3-C3-p14-N196-K37"),
    pytest.param(2, 3, 4, (3, 5), 4, id="B2-C3-p4-3x5"),
]
# Cheaper subset for the heavier ops (interpreted matmul, scatter over all N patches).
SMALL_CASES = [CASES[1], CASES[3], pytest.param(1, 3, 16, (4, 4), 5, id="B1-C3-p16-N16")]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ops, "POISON_OUTPUTS", True)


def _ids(b: int, n: int) -> torch.Tensor:
    """A fresh random permutation per image (ids_shuffle), as random masking draws it."""
    return torch.rand(b, n).argsort(dim=1)


def _imgs(b, c, p, grid, dtype, requires_grad=False):
    shape = (b, c, grid[0] * p, grid[1] * p)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    return torch.randn(shape, dtype=dtype).requires_grad_(requires_grad)


def _norm(c):
    return (MEAN[:c], STD[:c]) if c == 3 else (torch.tensor([0.286]), torch.tensor([0.353]))


# ------------------------------------------------------------------------------------------------ patch gather
def test_reference_gather_is_patchify_then_gather():
    """The reference gathers K patches without patchifying the batch; it must equal MAE's patchify + gather."""
    b, c, p, grid, k = 2, 3, 8, (4, 6), 9
    ids = _ids(b, 24)[:, :k]
    mean, std = _norm(c)
    for dtype in (torch.float32, torch.bfloat16, torch.uint8):
        imgs = _imgs(b, c, p, grid, dtype)
        naive = torch.gather(ref.patchify(ref.normalize_images(imgs, mean, std), p), 1,
                             ids.unsqueeze(-1).expand(-1, -1, p * p * c))
        assert torch.equal(ref.patchify_gather(imgs, ids, p, mean, std), naive)  # same elementwise arithmetic
        x = naive.float()
        t = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6) ** 0.5
        assert torch.equal(ref.norm_pix_targets(imgs, ids, p, True, mean, std), t)


@pytest.mark.parametrize("b,c,p,grid,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patchify_gather_float_is_bit_exact(b, c, p, grid, k, dtype):
    imgs = _imgs(b, c, p, grid, dtype, requires_grad=True)
    ids = _ids(b, grid[0] * grid[1])[:, :k]
    out = ops.patchify_gather(imgs, ids, p)
    exp = ref.patchify_gather(imgs, ids, p)
    assert out.dtype == dtype and out.shape == (b, k, p * p * c)
    assert torch.equal(out, exp)  # a pure copy
    # Backward: a scatter into the image, zeros where no patch was gathered; also a pure copy.
    go = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, imgs, go)
    (g_ref,) = torch.autograd.grad(exp, imgs, go)
    assert torch.equal(g, g_ref)


def test_patchify_gather_channels_last_and_cast():
    b, c, p, grid, k = 2, 3, 4, (3, 5), 6
    imgs = _imgs(b, c, p, grid, torch.float32, requires_grad=True)
    cl = imgs.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    ids = _ids(b, 15)[:, :k]
    out = ops.patchify_gather(cl, ids, p, out_dtype=torch.bfloat16)  # read through strides, round to bf16
    exp = ref.patchify_gather(imgs, ids, p, out_dtype=torch.bfloat16)
    assert torch.equal(out, exp)
    go = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, cl, go)[0], torch.autograd.grad(exp, imgs, go)[0])


@pytest.mark.parametrize("b,c,p,grid,k", CASES)
def test_patchify_gather_uint8_normalised(b, c, p, grid, k):
    imgs = _imgs(b, c, p, grid, torch.uint8)
    ids = _ids(b, grid[0] * grid[1])[:, :k]
    mean, std = _norm(c)
    out = ops.patchify_gather(imgs, ids, p, mean, std)
    exp = ref.patchify_gather(imgs, ids, p, mean, std)
    # (x/255 - mean)/std is folded into one fp32 FMA x*scale + shift: ~1 ulp from the two divisions, |x| < 3.
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    out16 = ops.patchify_gather(imgs, ids, p, mean, std, out_dtype=torch.bfloat16)
    assert out16.dtype == torch.bfloat16
    # Same fp32 values rounded to bf16: an ulp of fp32 difference can flip one bf16 rounding (2^-8 relative).
    torch.testing.assert_close(out16.float(), exp.bfloat16().float(), rtol=2**-7, atol=1e-5)
    # Without mean/std: x / 255.
    torch.testing.assert_close(ops.patchify_gather(imgs, ids, p), ref.patchify_gather(imgs, ids, p),
                               rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- patch embedding
@pytest.mark.parametrize("b,c,p,grid,k", CASES)
def test_matmul_on_visible_patches_equals_conv_then_gather(b, c, p, grid, k):
    """MAE: Conv2d on all N patches, + pos, gather K. Here: gather K patches, matmul, + gathered pos."""
    d = 72  # not a power of two
    n = grid[0] * grid[1]
    imgs = _imgs(b, c, p, grid, torch.float32)
    ids = _ids(b, n)[:, :k]
    w = torch.randn(d, c, p, p) * (p * p * c) ** -0.5
    bias, pos = torch.randn(d), torch.randn(1, n, d)
    full = F.conv2d(imgs, w, bias, stride=p).flatten(2).transpose(1, 2) + pos  # [B, N, D]
    exp = torch.gather(full, 1, ids.unsqueeze(-1).expand(-1, -1, d))
    # fp32 sums of p*p*C products in a different order (conv vs matmul): rounding-level differences.
    torch.testing.assert_close(ref.patch_embed_visible(ops.patchify_gather(imgs, ids, p), w, bias, pos, ids), exp,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.patch_embed_visible(imgs, ids, p, w, bias, pos), exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b,c,p,grid,k", SMALL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_patch_embed_forward_backward(b, c, p, grid, k, dtype):
    d = 40
    n = grid[0] * grid[1]
    ids = _ids(b, n)[:, :k]
    imgs = _imgs(b, c, p, grid, dtype, requires_grad=True)
    w = (torch.randn(d, c, p, p) * (p * p * c) ** -0.5).requires_grad_(True)
    bias = torch.randn(d, requires_grad=True)
    pos = torch.randn(1, n, d, requires_grad=True)
    out = ops.patch_embed_visible(imgs, ids, p, w, bias, pos)
    exp = ref.patch_embed_visible(ref.patchify_gather(imgs, ids, p), w, bias, pos, ids)
    assert out.dtype == dtype and out.shape == (b, k, d)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, [imgs, w, bias, pos], go)
    grads_ref = torch.autograd.grad(exp, [imgs, w, bias, pos], go)
    if dtype == torch.float32:
        # Accumulation order of p*p*C-long dot products (fwd, image grad) and B*K-long sums (weight grad).
        tol = dict(rtol=1e-5, atol=1e-5)
    else:
        # The reference rounds to bf16 after the matmul and again after + pos; the kernel rounds once, and
        # the bf16 backward matmuls round their inputs: differences of ~1-2 bf16 ulps (2^-8) of values ~O(1-10).
        tol = dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out, exp, **tol)
    for name, g, gr in zip(["imgs", "weight", "bias", "pos"], grads, grads_ref):
        torch.testing.assert_close(g, gr, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("b,c,p,grid,k", SMALL_CASES[:2])
def test_fused_patch_embed_uint8(b, c, p, grid, k):
    d = 24
    n = grid[0] * grid[1]
    imgs = _imgs(b, c, p, grid, torch.uint8)
    ids = _ids(b, n)[:, :k]
    mean, std = _norm(c)
    w = torch.randn(d, c, p, p) * (p * p * c) ** -0.5
    bias, pos = torch.randn(d), torch.randn(1, n, d)
    out = ops.patch_embed_visible(imgs, ids, p, w, None, pos, mean, std)
    exp = ref.patch_embed_visible(ref.patchify_gather(imgs, ids, p, mean, std), w, None, pos, ids)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)  # folded normalisation + dot order
    out16 = ops.patch_embed_visible(imgs, ids, p, w.bfloat16(), bias.bfloat16(), pos, mean, std, torch.bfloat16)
    exp16 = ref.patch_embed_visible(ref.patchify_gather(imgs, ids, p, mean, std, torch.bfloat16), w.bfloat16(),
                                    bias.bfloat16(), pos, ids)
    torch.testing.assert_close(out16, exp16, rtol=3e-2, atol=3e-2)  # bf16 rounding points differ (see above)


# ---------------------------------------------------------------------------------------------- norm-pix targets
@pytest.mark.parametrize("b,c,p,grid,k,dtype", [
    pytest.param(*CASES[0].values, torch.uint8, id="uint8-B1-C3-p16-N256"),
    pytest.param(*CASES[1].values, torch.uint8, id="uint8-B2-C1-p14-N196"),
    pytest.param(*CASES[2].values, torch.float32, id="fp32-B3-C3-p14-N196-K37"),
    pytest.param(*CASES[3].values, torch.float32, id="fp32-B2-C3-p4-3x5"),
    pytest.param(*CASES[1].values, torch.bfloat16, id="bf16-B2-C1-p14-N196"),
    pytest.param(*CASES[3].values, torch.uint8, id="uint8-B2-C3-p4-3x5"),
])
def test_norm_pix_targets_masked_only(b, c, p, grid, k, dtype):
    n = grid[0] * grid[1]
    imgs = _imgs(b, c, p, grid, dtype)
    masked = _ids(b, n)[:, k:]
    mean, std = _norm(c) if dtype == torch.uint8 else (None, None)
    out = ops.norm_pix_targets(imgs, masked, p, True, mean, std)
    exp = ref.norm_pix_targets(imgs, masked, p, True, mean, std)
    assert out.dtype == torch.float32 and out.shape == (b, n - k, p * p * c)
    # fp32 mean/variance over p*p*C values in another summation order (and the folded uint8 normalisation).
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-5)
    raw = ops.norm_pix_targets(imgs, masked, p, False, mean, std)
    raw_exp = ref.norm_pix_targets(imgs, masked, p, False, mean, std)
    if dtype == torch.uint8:
        torch.testing.assert_close(raw, raw_exp, rtol=1e-5, atol=1e-5)  # folded normalisation
    else:
        assert torch.equal(raw, raw_exp)  # a copy with an exact upcast


@pytest.mark.parametrize("b,c,p,grid,k", SMALL_CASES[:2])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_norm_pix_targets_backward(b, c, p, grid, k, norm_pix):
    n = grid[0] * grid[1]
    imgs = _imgs(b, c, p, grid, torch.float32, requires_grad=True)
    masked = _ids(b, n)[:, k:]
    out = ops.norm_pix_targets(imgs, masked, p, norm_pix)
    exp = ref.norm_pix_targets(imgs, masked, p, norm_pix)
    go = torch.randn_like(out)
    g, g_ref = torch.autograd.grad(out, imgs, go)[0], torch.autograd.grad(exp, imgs, go)[0]
    # Closed-form gradient of the normalisation vs autograd's chain through mean/var: rounding-level.
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------- masked loss
@pytest.mark.parametrize("shape,dtypes", [
    ((1, 192, 768), (torch.bfloat16, torch.float32)),
    ((2, 147, 196), (torch.float32, torch.float32)),
    ((3, 5, 48), (torch.bfloat16, torch.bfloat16)),
    ((3, 5, 48), (torch.float32, torch.float32)),
    ((1, 1, 7), (torch.bfloat16, torch.float32)),
])
def test_masked_mse(shape, dtypes):
    pred = torch.randn(shape, dtype=dtypes[0], requires_grad=True)
    target = torch.randn(shape, dtype=dtypes[1], requires_grad=True)
    loss = ops.masked_mse(pred, target)
    exp = ref.masked_mse(pred, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-7)  # fp32 partial sums in another order
    gl = torch.rand(())  # a loss weight != 1 must scale the gradient
    gp, gt = torch.autograd.grad(loss, [pred, target], gl)
    gp_ref, gt_ref = torch.autograd.grad(exp, [pred, target], gl)
    # Same operation order as autograd: (g / numel) * (2 * (pred - target)), rounded once to the input dtype.
    torch.testing.assert_close(gp, gp_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gt, gt_ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("b,c,p,grid,k,img_dtype,pred_dtype", [
    pytest.param(*CASES[0].values, torch.uint8, torch.bfloat16, id="uint8-bf16-B1-C3-p16-N256"),
    pytest.param(*CASES[1].values, torch.uint8, torch.float32, id="uint8-fp32-B2-C1-p14-N196"),
    pytest.param(*CASES[3].values, torch.float32, torch.float32, id="fp32-fp32-B2-C3-p4-3x5"),
    pytest.param(*CASES[3].values, torch.bfloat16, torch.bfloat16, id="bf16-bf16-B2-C3-p4-3x5"),
])
def test_norm_pix_mse_fused_loss(b, c, p, grid, k, img_dtype, pred_dtype):
    """Loss straight from the pixels equals masked_mse(pred, norm_pix_targets(...)) of the reference."""
    n = grid[0] * grid[1]
    imgs = _imgs(b, c, p, grid, img_dtype)
    masked = _ids(b, n)[:, k:]
    mean, std = _norm(c) if img_dtype == torch.uint8 else (None, None)
    for norm_pix in (True, False):
        pred = torch.randn(b, n - k, p * p * c, dtype=pred_dtype, requires_grad=True)
        loss = ops.norm_pix_mse(pred, imgs, masked, p, norm_pix, mean, std)
        exp = ref.norm_pix_mse(pred, imgs, masked, p, norm_pix, mean, std)
        # Targets agree to ~1e-6 (statistics in another order, folded uint8 normalisation), sums in another order.
        torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-6)
        gl = torch.rand(())
        gp, gp_ref = torch.autograd.grad(loss, pred, gl)[0], torch.autograd.grad(exp, pred, gl)[0]
        scale = float(gl) * 2 / pred.numel()  # gp = scale * (pred - target): target differences of ~1e-5 at most
        tol = dict(rtol=1e-5, atol=1e-5 * scale) if pred_dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5 * scale)
        torch.testing.assert_close(gp, gp_ref, **tol)


def test_norm_pix_mse_image_grad_falls_back():
    """Float images that require grad go through the differentiable two-op path."""
    b, c, p, grid, k = 2, 3, 4, (3, 5), 4
    imgs = _imgs(b, c, p, grid, torch.float32, requires_grad=True)
    masked = _ids(b, 15)[:, k:]
    pred = torch.randn(b, 15 - k, p * p * c)
    g = torch.autograd.grad(ops.norm_pix_mse(pred, imgs, masked, p), imgs)[0]
    g_ref = torch.autograd.grad(ref.norm_pix_mse(pred, imgs, masked, p), imgs)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_masked_mse_equals_mae_full_loss():
    """The loss on masked positions only equals MAE's loss over all N patches weighted by the mask."""
    b, n, k, pdim = 2, 196, 49, 48
    pred_full, target_full = torch.randn(b, n, pdim), torch.randn(b, n, pdim)
    ids = _ids(b, n)
    mask = torch.ones(b, n)
    mask[:, :k] = 0
    mask = torch.gather(mask, 1, ids.argsort(1))
    take = lambda x: torch.gather(x, 1, ids[:, k:, None].expand(-1, -1, pdim))  # noqa: E731
    torch.testing.assert_close(ops.masked_mse(take(pred_full), take(target_full)),
                               ref.masked_mse_full(pred_full, target_full, mask), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------------ dispatch
def test_dispatch_triton_matches_torch():
    b, c, p, grid, k = 2, 3, 4, (3, 5), 4
    imgs = _imgs(b, c, p, grid, torch.uint8)
    ids = _ids(b, 15)
    for be in ("triton", "torch"):
        assert dispatch.resolve_kernels(be) == be
    args = (imgs, ids[:, :k], p, MEAN, STD)
    # the two building blocks have no dispatch function of their own (the model never calls them directly): the
    # table's two sides are what gpu-check compares
    gather, targets = dispatch.KERNEL_OPS["patchify_gather"], dispatch.KERNEL_OPS["norm_pix_targets"]
    torch.testing.assert_close(gather.impl("triton")(*args), gather.impl("torch")(*args), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets.impl("triton")(imgs, ids[:, k:], p, True, MEAN, STD),
                               targets.impl("torch")(imgs, ids[:, k:], p, True, MEAN, STD), rtol=1e-5, atol=1e-5)
    w, bias, pos = torch.randn(8, c, p, p), torch.randn(8), torch.randn(1, 15, 8)
    torch.testing.assert_close(
        dispatch.patch_embed_visible(imgs, ids[:, :k], p, w, bias, pos, MEAN, STD, backend="triton"),
        dispatch.patch_embed_visible(imgs, ids[:, :k], p, w, bias, pos, MEAN, STD, backend="torch"),
        rtol=1e-5, atol=1e-5)


def test_user_errors_are_clear():
    imgs = torch.randn(1, 3, 10, 12)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        ops.patchify_gather(imgs, torch.zeros(1, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="ids must be an integer tensor"):
        ops.patchify_gather(torch.randn(1, 3, 8, 8), torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="one value per channel"):
        ops.patchify_gather(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 2, dtype=torch.long), 4,
                            [0.5, 0.5], [0.2, 0.2])
    with pytest.raises(ValueError, match="same shape"):
        ops.masked_mse(torch.randn(2, 3), torch.randn(3, 2))


def test_gpu_launch_configuration(monkeypatch):
    """The tests above run with the interpreter's large tiles; run every op once with the GPU tile sizes too."""
    monkeypatch.setattr(ops, "_rows_per_prog", lambda block: max(1, 4096 // block))
    monkeypatch.setattr(ops, "_embed_tiles", lambda: (64, 64, 32))
    monkeypatch.setattr(ops, "_MSE_BLOCK", 1024)
    monkeypatch.setattr(ops, "_MSE_CHUNKS", 8)
    b, c, p, grid, k, d = 2, 3, 8, (3, 5), 6, 136
    n = grid[0] * grid[1]
    imgs = _imgs(b, c, p, grid, torch.float32, requires_grad=True)
    ids = _ids(b, n)
    out = ops.patchify_gather(imgs, ids[:, :k], p)
    exp = ref.patchify_gather(imgs, ids[:, :k], p)
    assert torch.equal(out, exp)
    go = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, imgs, go)[0], torch.autograd.grad(exp, imgs, go)[0])
    torch.testing.assert_close(ops.norm_pix_targets(imgs, ids[:, k:], p), ref.norm_pix_targets(imgs, ids[:, k:], p),
                               rtol=1e-5, atol=1e-5)
    w, bias, pos = torch.randn(d, c, p, p) * 0.05, torch.randn(d), torch.randn(1, n, d)
    torch.testing.assert_close(ops.patch_embed_visible(imgs, ids[:, :k], p, w, bias, pos),
                               ref.patch_embed_visible(exp, w, bias, pos, ids[:, :k]), rtol=1e-5, atol=1e-5)
    pred, target = torch.randn(3, 50, 200), torch.randn(3, 50, 200)  # 30000 elements: several programs
    torch.testing.assert_close(ops.masked_mse(pred, target), ref.masked_mse(pred, target), rtol=1e-5, atol=1e-7)
    pred = torch.randn(b, n - k, p * p * c, requires_grad=True)
    loss = ops.norm_pix_mse(pred, imgs.detach(), ids[:, k:], p)
    exp = ref.norm_pix_mse(pred, imgs.detach(), ids[:, k:], p)
    torch.testing.assert_close(loss, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, pred)[0], torch.autograd.grad(exp, pred)[0], rtol=1e-5,
                               atol=1e-9)


def test_resolve_kernels(monkeypatch):
    assert dispatch.resolve_kernels("auto", "cpu") == "torch"  # auto never picks the interpreter
    assert dispatch.resolve_kernels("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="unknown kernels backend"):
        dispatch.resolve_kernels("cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="model.kernels=triton cannot run: no CUDA device"):
        dispatch.resolve_kernels("triton", "cpu")
