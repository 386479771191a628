"""Analytic cost of one training step: an op list with FLOPs, bytes moved and matmul flag, per objective.

Conventions (the numbers every consumer of this module sees):

- A multiply-add is 2 FLOPs. ``forward_flops`` / ``train_flops`` count **matmul FLOPs only** (linear layers,
  the patch-embedding matmul or convolution, and the two attention products Q K^T and A V), the quantity
  MFU is conventionally defined on and the one ``torch.utils.flop_counter.FlopCounterMode`` reports (it counts
  mm / addmm / bmm / convolution / SDPA and nothing else). Normalisations, softmax, GELU, losses and the
  optimizer carry a nominal FLOP estimate in the op list for the roofline, but are not in those totals.
- Backward of a matmul ``Y = X W`` costs one product per gradient it must produce: dX = dY W^T (only when X
  needs a gradient) and dW = X^T dY (only when W is a parameter). So most matmuls cost 2x forward in
  backward, but the patch embedding costs 1x (the pixels need no gradient) and an attention product costs 2x
  (both operands need gradients). ``train_flops`` = forward + that backward, i.e. slightly under 3x forward.
  These are *model* FLOPs: activation recomputation (``model.grad_checkpointing``) is not counted there,
  but the op list does include it as extra backward work, because it costs time.
- ``fused=True`` is fastsupmae's path: visible patches gathered first and embedded by a matmul on K rows,
  SDPA (flash-style, the T x T scores never reach memory), the decoder in the shuffled order with the first
  block's norm1 + qkv of the mask tokens computed once per patch position and the last block, the final norm
  and the prediction on the M masked tokens only, targets and loss on masked patches only, one-pass (fused) AdamW.
  ``fused=False`` is the unfused MAE-style reference: normalise the full image, convolution on all N
  patches then gather, explicit attention that writes the score matrix, cat/gather/cat/add unshuffle,
  prediction on all 1+N decoder tokens, full-image norm-pix targets and full loss then mask, and
  ``torch.optim.AdamW``'s multi-tensor (foreach) update; under bf16 it runs autocast on fp32 weights, so it
  also pays the per-step weight casts.
- Bytes are what an op must read plus write in HBM (or DRAM), at ``dtype_bytes`` per activation / weight
  element, with uint8 images at 1 byte and fp32 targets, losses and optimizer state at 4. Each op is
  assumed to stream its operands once (no cache reuse across ops); that is the roofline's memory term.

Shapes used below: B batch, N patches, K = num_keep visible, M = N - K masked, D / Dd encoder / decoder
width, P = p*p*C pixels per patch, T tokens of a sequence (1 + K, 1 + N).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config import is only for type hints; keep this module import-light
    from fastsupmae.config import Config

# Nominal FLOPs per element of the non-matmul ops (they are memory-bound; these only matter on a CPU roofline).
_LN_FLOPS = 8.0  # mean, var, normalise, affine
_GELU_FLOPS = 10.0  # erf polynomial
_SOFTMAX_FLOPS = 5.0
_ADAMW_FLOPS = 15.0  # per parameter: two moment updates, sqrt, div, decay, step

HOG_BINS = 9  # orientation bins of the HOG target (MaskFeat-style), see hog_dim


@dataclass(frozen=True)
class Op:
    """One op (or a group of identical ops repeated ``repeat`` times) of a training step.

    ``flops`` / ``bytes`` are the forward totals over all repeats, ``bwd_flops`` / ``bwd_bytes`` the backward
    totals (including ``recompute_flops``, forward work repeated inside backward, which costs time but is
    not model FLOPs). The optimizer is an op with forward figures only (stage ``optimizer``).
    """

    name: str
    stage: str  # shared key between the fused and unfused paths so their costs can be compared stage by stage
    flops: float
    bytes: float
    matmul: bool
    bwd_flops: float = 0.0
    bwd_bytes: float = 0.0
    repeat: int = 1
    recompute_flops: float = 0.0  # part of bwd_flops that re-runs forward work (flash backward, checkpointing)
    fp32: bool = False  # its elements are fp32 whatever the training dtype (targets, losses, optimizer state)

    @property
    def total_flops(self) -> float:
        return self.flops + self.bwd_flops

    @property
    def total_bytes(self) -> float:
        return self.bytes + self.bwd_bytes


class _Ops:
    """Accumulates :class:`Op` rows; knows the dtype sizes."""

    def __init__(self, dtype_bytes: int, attention: str, autocast: bool = False, kernels: str = "triton") -> None:
        self.db = float(dtype_bytes)
        self.kernels = kernels  # fused path: 'triton' (the GPU kernels) | 'torch' (their reference twins, CPU)
        self.attention = attention  # 'sdpa' (flash-style, scores stay on chip) | 'math' (explicit)
        self.autocast = autocast and dtype_bytes < 4
        self.rows: list[Op] = []

    def autocast_cast(self, name: str, stage: str, numel: float, repeat: int = 1) -> None:
        """Autocast runs layer_norm / softmax in fp32: their output is written in fp32 (+2 B per element) and
        read back (4 B) and rewritten in bf16 (2 B) by the next matmul's input cast; the same in backward."""
        if self.autocast:
            self.elem(f"{name}.autocast_cast", stage, 3 * numel, numel, flops_per=0.0, bwd=(3 * numel, numel),
                      repeat=repeat)

    def matmul(
        self,
        name: str,
        stage: str,
        m: int,
        k: int,
        n: int,
        *,
        count: int = 1,
        x_grad: bool = True,
        w_param: bool = True,
        w_grad: bool = True,
        repeat: int = 1,
    ) -> None:
        """``count`` independent products [m, k] x [k, n] (a bmm when count > 1), repeated ``repeat`` times.

        The second operand is a parameter when ``w_param`` (then read once per product, it is shared across
        the batch); ``w_grad`` says whether it needs a gradient (activations such as K and V do).
        """
        f = 2.0 * m * k * n * count
        x, w, y = m * k * count, k * n * (1 if w_param else count), m * n * count
        fwd_bytes = (x + w + y) * self.db
        bwd_f = (f if x_grad else 0.0) + (f if w_grad else 0.0)
        # dX reads dY and W, writes dX; dW reads X and dY, writes dW.
        bwd_b = ((y + w + x) if x_grad else 0.0) + ((x + y + w) if w_grad else 0.0)
        self.rows.append(Op(name, stage, f * repeat, fwd_bytes * repeat, True, bwd_f * repeat,
                            bwd_b * self.db * repeat, repeat))

    def elem(
        self,
        name: str,
        stage: str,
        read: float,
        write: float,
        *,
        flops_per: float = 1.0,
        bwd: tuple[float, float] | None = None,
        elem_bytes: float | None = None,
        repeat: int = 1,
        flops: float | None = None,
        bwd_flops: float | None = None,
    ) -> None:
        """A memory-bound op reading ``read`` and writing ``write`` elements (``elem_bytes`` each).

        ``bwd`` is (read, write) element counts of its backward, or None when no gradient flows through it.
        FLOPs default to ``flops_per`` per written element (forward and backward); reductions pass ``flops``
        / ``bwd_flops`` (totals per repeat) instead.
        """
        eb = self.db if elem_bytes is None else float(elem_bytes)
        br, bw = bwd or (0.0, 0.0)
        f = flops_per * write if flops is None else flops
        bf = (flops_per * bw if bwd_flops is None else bwd_flops) if bwd else 0.0
        self.rows.append(Op(name, stage, f * repeat, (read + write) * eb * repeat, False, bf * repeat,
                            (br + bw) * eb * repeat, repeat, fp32=eb == 4.0))


def hog_cell(p: int) -> int:
    """Cell side of the HOG target (as fastsupmae.models.targets): 2 x 2 cells per patch where p allows."""
    return p // 2 if p % 2 == 0 and p >= 4 else p


def pred_dim(cfg: Config) -> int:
    """Output width of the decoder prediction per token: pixels p*p*C, HOG histograms, or tokenizer logits."""
    m = cfg.model
    p = m.patch_size
    if m.objective == "mim_supervised" and m.mim_target == "hog":
        return (p // hog_cell(p)) ** 2 * HOG_BINS
    if m.objective == "mim_supervised" and m.mim_target == "tokens":
        return m.mim_vocab_size
    return p * p * m.in_chans


def _has_final_norm(cfg: Config) -> bool:
    """SupMAE / MAE keep the encoder's final LayerNorm; timm-style avg-pool classifiers use fc_norm instead."""
    return cfg.model.objective in ("supmae", "mae") or not cfg.model.global_pool


def param_count(cfg: Config) -> int:
    """Trainable parameters of ``build_model(cfg)`` (the fixed sin-cos position embeddings are buffers)."""
    m = cfg.model
    d, depth, _ = m.resolved_dims()
    dd, p, obj = m.decoder_embed_dim, m.patch_size, m.objective

    def block(w: int) -> int:  # norm1, qkv, proj, norm2, fc1, fc2
        h = int(w * m.mlp_ratio)
        return 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * h + h) + (h * w + w)

    n = p * p * m.in_chans * d + d + d + depth * block(d)  # patch_embed.proj, cls_token, blocks
    if _has_final_norm(cfg):
        n += 2 * d
    if obj in ("supmae", "mae", "mim_supervised"):
        q = pred_dim(cfg)
        n += d * dd + dd + m.decoder_depth * block(dd) + 2 * dd + dd * q + q  # embed, blocks, norm, pred
        if obj != "mim_supervised" or m.mim_encoder_input == "visible":
            n += dd  # decoder mask_token
    if obj == "mim_supervised":
        n += d if m.mim_encoder_input == "full" else 0  # enc_mask_token
        n += 2 * d if m.global_pool else 0  # decoder_input_norm
    c, hc = m.num_classes, m.cls_hidden_dim
    if obj == "supmae":  # cls_head: Linear(D, Hc) + BatchNorm1d(Hc) + ReLU + Linear(Hc, C)
        n += d * hc + hc + 2 * hc + hc * c + c
    elif obj in ("supervised", "mim_supervised"):  # fc_norm (avg pool only) + head
        n += (2 * d if m.global_pool else 0) + d * c + c
    return n


def _blocks(o: _Ops, cfg: Config, b: int, t: int, w: int, heads: int, depth: int, fused: bool, tag: str,
            recompute: bool, first_qkv_rows: int | None = None, last_q_len: int | None = None) -> None:
    """``depth`` pre-norm blocks on [B, T, w]; with ``recompute`` their forward runs again inside backward.

    fastsupmae's decoder (see fastsupmae.models.decoder.decode_shuffled) passes ``first_qkv_rows``: block 0
    runs norm1 + qkv on that many rows (the visible tokens + one per patch position) and gathers the rest; and
    ``last_q_len``: in the last block only that many tokens per image (the masked ones) ask in attention and go
    through proj, norm2 and the MLP.
    """
    start = len(o.rows)
    kinds: list[tuple[str, int, int | None, int]] = []  # (name suffix, repeat, qkv rows, query length)
    r = depth
    if r and first_qkv_rows is not None:
        kinds.append((" (block 0)", 1, first_qkv_rows, last_q_len if r == 1 and last_q_len else t))
        r -= 1
    if r and last_q_len is not None:
        kinds.append(("", r - 1, None, t))
        kinds.append((" (last block)", 1, None, last_q_len))
    elif r:
        kinds.append(("", r, None, t))
    for suffix, rep, qkv_rows, lq in kinds:
        if rep:
            _block(o, cfg, b, t, w, heads, rep, tag, suffix, qkv_rows, lq)
    if recompute:
        # Non-reentrant checkpointing stops recomputing once the last tensor backward needs exists: fc2's
        # input (the GELU output). fc2 and the second residual add are not re-run.
        for i in range(start, len(o.rows)):
            op = o.rows[i]
            if op.name.endswith(("mlp.fc2", "residual2")):
                continue
            o.rows[i] = replace(op, bwd_flops=op.bwd_flops + op.flops, bwd_bytes=op.bwd_bytes + op.bytes,
                                recompute_flops=op.recompute_flops + op.flops)


def _block(o: _Ops, cfg: Config, b: int, t: int, w: int, heads: int, r: int, tag: str, suffix: str,
           qkv_rows: int | None, lq: int) -> None:
    """``r`` identical blocks: T tokens answer (keys, values), ``lq`` of them ask (queries) and continue;
    norm1 + qkv on ``qkv_rows`` rows (default B*T) then gathered to B*T."""
    btd, bqd, hid = b * t * w, b * lq * w, int(w * cfg.model.mlp_ratio)
    rows = b * t if qkv_rows is None else qkv_rows
    o.elem(f"{tag}.norm1{suffix}", f"{tag}.layernorm", rows * w, rows * w, flops_per=_LN_FLOPS,
           bwd=(2 * rows * w, rows * w), repeat=r)  # reads x and dy, writes dx (affine gradients negligible)
    o.autocast_cast(f"{tag}.norm1{suffix}", f"{tag}.layernorm", rows * w, r)
    o.matmul(f"{tag}.attn.qkv{suffix}", f"{tag}.qkv", rows, w, 3 * w, repeat=r)
    if qkv_rows is not None:  # gather the shared rows and concatenate (backward: slice + index_add)
        q3 = 3 * btd
        o.elem(f"{tag}.attn.qkv_gather{suffix}", f"{tag}.qkv", q3, q3, flops_per=0.0, bwd=(q3, q3), repeat=r)
    dh = w // heads
    if o.attention != "math":
        # SDPA (flash-style): reads q, k, v and writes out; backward reads q, k, v, out, dout and writes
        # dq, dk, dv, recomputing Q K^T on the way (0.5x of the forward products, hardware work only).
        f = 4.0 * b * lq * t * w
        o.rows.append(Op(f"{tag}.attn.sdpa{suffix}", f"{tag}.attn_core", f * r, (2 * bqd + 2 * btd) * o.db * r,
                         True, 2.5 * f * r, (4 * bqd + 4 * btd) * o.db * r, r, recompute_flops=0.5 * f * r))
    else:
        # explicit attention: q * scale, S = q k^T, softmax(S), S v; the [B, h, Lq, T] scores go through memory
        o.elem(f"{tag}.attn.scale_q{suffix}", f"{tag}.attn_core", bqd, bqd, bwd=(bqd, bqd), repeat=r)
        o.matmul(f"{tag}.attn.qk{suffix}", f"{tag}.attn_core", lq, dh, t, count=b * heads, w_param=False, repeat=r)
        s = b * heads * lq * t
        o.elem(f"{tag}.attn.softmax{suffix}", f"{tag}.attn_core", s, s, flops_per=_SOFTMAX_FLOPS, bwd=(2 * s, s),
               repeat=r)
        o.autocast_cast(f"{tag}.attn.softmax{suffix}", f"{tag}.attn_core", s, r)
        o.matmul(f"{tag}.attn.av{suffix}", f"{tag}.attn_core", lq, t, dh, count=b * heads, w_param=False, repeat=r)
    # [B, h, Lq, dh] -> [B, Lq, D]: a transpose copy in both paths (and its mirror in backward)
    o.elem(f"{tag}.attn.merge_heads{suffix}", f"{tag}.attn_core", bqd, bqd, flops_per=0.0, bwd=(bqd, bqd),
           repeat=r)
    o.matmul(f"{tag}.attn.proj{suffix}", f"{tag}.proj", b * lq, w, w, repeat=r)
    o.elem(f"{tag}.residual1{suffix}", f"{tag}.residual", 2 * bqd, bqd, bwd=(2 * bqd, bqd), repeat=r)
    o.elem(f"{tag}.norm2{suffix}", f"{tag}.layernorm", bqd, bqd, flops_per=_LN_FLOPS, bwd=(2 * bqd, bqd), repeat=r)
    o.autocast_cast(f"{tag}.norm2{suffix}", f"{tag}.layernorm", bqd, r)
    o.matmul(f"{tag}.mlp.fc1{suffix}", f"{tag}.mlp", b * lq, w, hid, repeat=r)
    o.elem(f"{tag}.mlp.gelu{suffix}", f"{tag}.gelu", b * lq * hid, b * lq * hid, flops_per=_GELU_FLOPS,
           bwd=(2 * b * lq * hid, b * lq * hid), repeat=r)
    o.matmul(f"{tag}.mlp.fc2{suffix}", f"{tag}.mlp", b * lq, hid, w, repeat=r)
    o.elem(f"{tag}.residual2{suffix}", f"{tag}.residual", 2 * bqd, bqd, bwd=(2 * bqd, bqd), repeat=r)


def _encoder(o: _Ops, cfg: Config, b: int, t: int, fused: bool, tag: str = "encoder") -> None:
    """Encoder blocks on [B, T, D] (+ the final LayerNorm where the model has one)."""
    m = cfg.model
    d, depth, heads = m.resolved_dims()
    _blocks(o, cfg, b, t, d, heads, depth, fused, tag, bool(m.grad_checkpointing))
    if _has_final_norm(cfg):
        btd = b * t * d
        o.elem(f"{tag}.norm", f"{tag}.norm", btd, btd, flops_per=_LN_FLOPS, bwd=(2 * btd, btd))
        o.autocast_cast(f"{tag}.norm", f"{tag}.norm", btd)


def _patch_embed(o: _Ops, cfg: Config, b: int, rows: int, fused: bool, mask_select: bool = False) -> None:
    """Pixels -> [B, 1 + rows, D] tokens (cls first).

    ``rows`` < N (visible patches only): fused = gather the patches straight from the uint8 image
    (normalising on the way), one matmul on B*K rows, position embedding added in its epilogue; unfused =
    normalise the whole image, convolution on all N patches, flatten/transpose, add positions, then gather.
    ``rows`` == N (no masking, or mim's full input): both paths normalise and convolve all patches.
    """
    m = cfg.model
    d, db = m.resolved_dims()[0], o.db
    n, pp = m.num_patches, m.patch_size * m.patch_size * m.in_chans
    img = b * m.in_chans * m.img_size[0] * m.img_size[1]
    bkd, bnd = b * rows * d, b * n * d
    if fused and rows < n and o.kernels == "torch":
        # the kernels' torch twins (CPU): normalise + patchify the whole image, gather K, cast, matmul, pos
        full = b * n * pp
        o.elem("patchify_gather.normalize", "patch_embed", full / 4.0, full, flops_per=2.0, elem_bytes=4.0)
        o.elem("patchify_gather.patchify", "patch_embed", full, full, flops_per=0.0, elem_bytes=4.0)
        o.elem("patchify_gather.gather", "patch_embed", b * rows * pp + b * rows, b * rows * pp, flops_per=0.0,
               elem_bytes=4.0)
        if db < 4:
            o.elem("patchify_gather.cast", "patch_embed", b * rows * pp * 4.0 / db, b * rows * pp, flops_per=0.0)
        o.matmul("patch_embed.matmul", "patch_embed", b * rows, pp, d, x_grad=False)
        o.elem("patch_embed.pos_gather_add", "patch_embed", 3 * bkd, 2 * bkd, bwd=(bkd, 0))
    elif fused and rows < n:
        # One kernel: the matmul's A tiles are loaded straight from the uint8 pixels of the kept patches
        # (normalised in registers); bias and the gathered position rows are added in the epilogue.
        # Backward: dW = dY^T patches (patches re-gathered from the image), and the pos-embedding gradient
        # (an index_add of dY, only when it is trainable; the fixed sin-cos one is not).
        f = 2.0 * b * rows * pp * d
        fwd_b = b * rows * pp * 1.0 + (pp * d + bkd + bkd) * db
        bwd_b = b * rows * pp * 1.0 + (bkd + pp * d) * db
        o.rows.append(Op("patch_embed_visible (gather+matmul+pos)", "patch_embed", f, fwd_b, True, f, bwd_b))
    else:
        # uint8 -> fp32 normalised image, then cast to the compute dtype (autocast / bf16 params)
        o.elem("normalize_images", "patch_embed", img / 4.0, img, flops_per=2.0, elem_bytes=4.0)
        if db < 4:
            o.elem("cast_images", "patch_embed", img * 4.0 / db, img, flops_per=0.0)
        o.matmul("patch_embed.conv", "patch_embed", b * n, pp, d, x_grad=False)
        o.elem("patch_embed.flatten_transpose", "patch_embed", bnd, bnd, flops_per=0.0, bwd=(bnd, bnd))
        if mask_select:  # x * (1 - w) + mask_token * w + pos: four elementwise passes over [B, N, D]
            o.elem("mask_token_select_pos_add", "patch_embed", 7 * bnd, 4 * bnd, bwd=(4 * bnd, 2 * bnd))
        else:
            o.elem("patch_embed.pos_add", "patch_embed", 2 * bnd, bnd, bwd=(bnd, 0))
        if rows < n:
            o.elem("gather_visible", "patch_embed", bkd + b * rows, bkd, flops_per=0.0, bwd=(bkd, bnd))
    t = rows + 1
    o.elem("cls_concat", "patch_embed", bkd, b * t * d, flops_per=0.0, bwd=(b * t * d, bkd))


def _masking(o: _Ops, cfg: Config, b: int) -> None:
    """Noise, two argsorts, the index tensors and the mask (counted as int64-sized elements)."""
    n = cfg.model.num_patches
    o.elem("masking.argsort", "masking", 3 * b * n, 4 * b * n, flops_per=float(max(1, n.bit_length())),
           elem_bytes=8.0)


def _decoder(o: _Ops, cfg: Config, b: int, t_in: int, fused: bool) -> None:
    """(mim: decoder_input_norm) decoder_embed on the encoder's T_in tokens, 1 + N decoder tokens, blocks, norm."""
    m = cfg.model
    d, dd, n = m.resolved_dims()[0], m.decoder_embed_dim, m.num_patches
    if m.objective == "mim_supervised" and m.global_pool:
        x = b * t_in * d
        o.elem("decoder_input_norm", "decoder_embed", x, x, flops_per=_LN_FLOPS, bwd=(2 * x, x))
        o.autocast_cast("decoder_input_norm", "decoder_embed", x)
    o.matmul("decoder_embed", "decoder_embed", b * t_in, d, dd)
    t = 1 + n
    full, vis = b * t * dd, b * t_in * dd
    shared, masked = None, False
    if t_in < t and fused:
        # fastsupmae: the decoder runs in the shuffled order (cls, visible, masked): add the gathered positions
        # to the visible tokens, build the [N, Dd] table mask_token + pos, concatenate visible + gathered table
        # rows; block 0's norm1 + qkv see the visible tokens and the N table rows only
        o.elem("decoder_input.pos_gather_add", "unshuffle", 2 * vis + b * t_in, vis, bwd=(vis, vis))
        o.elem("decoder_input.mask_table", "unshuffle", 2 * n * dd, n * dd, bwd=(n * dd, dd))
        o.elem("decoder_input.cat", "unshuffle", full, full, flops_per=0.0, bwd=(full, full))
        shared = b * t_in + n if b * (t - t_in) > n else None  # the model shares once that is fewer rows
        masked = True
    elif t_in < t:  # visible tokens + mask tokens -> patch order, + decoder position embedding
        o.elem("unshuffle.cat_mask_tokens", "unshuffle", vis, b * n * dd, flops_per=0.0, bwd=(b * n * dd, vis))
        o.elem("unshuffle.gather", "unshuffle", b * n * dd + b * n, b * n * dd, flops_per=0.0,
               bwd=(b * n * dd, b * n * dd))
        o.elem("unshuffle.cat_cls", "unshuffle", b * n * dd + b * dd, full, flops_per=0.0, bwd=(full, full))
        o.elem("unshuffle.pos_add", "unshuffle", 2 * full, full, bwd=(full, 0))
    else:
        o.elem("decoder.pos_add", "unshuffle", 2 * full, full, bwd=(full, 0))
    # the model checkpoints only encoder blocks, so decoder blocks never recompute
    last_q = n - (t_in - 1) if masked else None  # fastsupmae: the last block and norm see the masked
    _blocks(o, cfg, b, t, dd, m.decoder_num_heads, m.decoder_depth, fused, "decoder", False, shared, last_q)
    out = full if last_q is None else b * last_q * dd
    o.elem("decoder.norm", "decoder.norm", out, out, flops_per=_LN_FLOPS, bwd=(2 * out, out))
    o.autocast_cast("decoder.norm", "decoder.norm", out)


def _prediction_and_loss(o: _Ops, cfg: Config, b: int, fused: bool) -> None:
    """decoder_pred, targets and the reconstruction loss."""
    m = cfg.model
    dd, n, k = m.decoder_embed_dim, m.num_patches, m.num_keep
    mm, q, db = n - k, pred_dim(cfg), o.db
    pp = m.patch_size * m.patch_size * m.in_chans
    target = m.mim_target if m.objective == "mim_supervised" else "pixels"
    # (the shuffled-order decoder of the visible-token models needs no gather: its masked tokens are a slice)
    if fused and m.objective == "mim_supervised" and m.mim_encoder_input == "full":
        # patch-order decoder: gather the masked tokens first, the matmul skips the rows the loss would discard
        o.elem("gather_masked_tokens", "prediction", b * mm * dd + b * mm, b * mm * dd, flops_per=0.0,
               bwd=(b * mm * dd, b * n * dd))
    rows = mm if fused else 1 + n  # MAE predicts every decoder token (cls included), then drops cls
    o.matmul("decoder_pred", "prediction", b * rows, dd, q)
    tr = mm if fused else n  # target / loss rows
    if target == "pixels":
        if fused and o.kernels == "triton":  # one pass: uint8 patches of the masked ids -> fp32 targets
            o.elem("norm_pix_targets", "targets", b * mm * pp / 4.0, b * mm * pp, flops_per=6.0, elem_bytes=4.0)
        elif fused:  # torch twin: normalise + patchify the whole image, gather M, then normalise M patches
            x, xm = b * n * pp, b * mm * pp
            o.elem("targets.normalize_patchify", "targets", x / 4.0 + x, 2 * x, flops_per=2.0, elem_bytes=4.0)
            o.elem("targets.gather_masked", "targets", xm + b * mm, xm, flops_per=0.0, elem_bytes=4.0)
            if m.norm_pix_loss:
                o.elem("targets.mean_var", "targets", 2 * xm, 2 * b * mm, flops=4.0 * xm, elem_bytes=4.0)
                o.elem("targets.normalise", "targets", xm + 2 * b * mm, xm, flops_per=2.0, elem_bytes=4.0)
        else:
            x = b * n * pp
            o.elem("targets.normalize_patchify", "targets", x / 4.0 + x, 2 * x, flops_per=2.0, elem_bytes=4.0)
            if m.norm_pix_loss:
                o.elem("targets.mean_var", "targets", 2 * x, 2 * b * n, flops=4.0 * x, elem_bytes=4.0)
                o.elem("targets.normalise", "targets", x + 2 * b * n, x, flops_per=2.0, elem_bytes=4.0)
    elif target == "hog":
        img = b * m.img_size[0] * m.img_size[1]  # on the channel-mean image
        # two 3-tap gradient filters run as convolutions (FlopCounterMode counts them), no gradient
        o.rows.append(Op("targets.hog_gradient_conv", "targets", 2 * 2.0 * 3 * img, 2 * 2 * img * 4.0, True))
        o.elem("targets.hog_histograms", "targets", b * m.in_chans * img / b + 6 * img, 6 * img + b * n * q,
               flops_per=4.0, elem_bytes=4.0)
    else:  # tokens: the tokenizer is user code (its cost is not modelled); ids [B, N] int64
        o.elem("targets.token_ids", "targets", b * n, b * tr, flops_per=0.0, elem_bytes=8.0)
    x = b * tr * q
    if target == "tokens":  # cross-entropy over the vocabulary in fp32: cast, log-softmax, pick
        o.elem("rec_loss.cross_entropy", "rec_loss", x * db / 4.0 + x, x, flops_per=_SOFTMAX_FLOPS,
               bwd=(2 * x, x * db / 4.0), elem_bytes=4.0)
    elif fused and o.kernels == "triton":  # one pass over pred and target writing a scalar; backward: dpred
        o.elem("rec_loss.masked_mse", "rec_loss", x * (db + 4.0) / 4.0, 1, flops=3.0 * x,
               bwd=(x * (db + 4.0) / 4.0, x * db / 4.0), bwd_flops=3.0 * x, elem_bytes=4.0)
    else:  # (slice,) cast pred to fp32, (pred - target)^2, mean (unfused: over the patch, * mask, sum / sum)
        o.elem("rec_loss.cast_pred", "rec_loss", x * db / 4.0, x, flops_per=0.0, bwd=(x, x * db / 4.0),
               elem_bytes=4.0)
        o.elem("rec_loss.sq_diff", "rec_loss", 2 * x, x, flops_per=2.0, bwd=(2 * x, x), elem_bytes=4.0)
        if fused:
            o.elem("rec_loss.mean", "rec_loss", x, 1, flops=x, bwd=(1, x), bwd_flops=x, elem_bytes=4.0)
            return
        o.elem("rec_loss.mean_mask_sum", "rec_loss", x + 2 * b * n, b * n, flops=x + 2 * b * n,
               bwd=(2 * b * n, x), bwd_flops=x, elem_bytes=4.0)


def _head(o: _Ops, cfg: Config, b: int, t: int) -> None:
    """Classification head on encoder tokens [B, T, D] (cls first) and its cross-entropy."""
    m = cfg.model
    d, c, hc = m.resolved_dims()[0], m.num_classes, m.cls_hidden_dim
    if m.global_pool:
        o.elem("head.mean_pool", "head", b * (t - 1) * d, b * d, flops=b * (t - 1) * d,
               bwd=(b * d, b * (t - 1) * d), bwd_flops=b * (t - 1) * d)
    if m.objective == "supmae":
        o.matmul("head.fc1", "head", b, d, hc)
        o.elem("head.bn_relu", "head", 2 * b * hc, b * hc, flops_per=6.0, bwd=(3 * b * hc, b * hc))
        o.matmul("head.fc2", "head", b, hc, c)
    else:
        if m.global_pool:
            o.elem("head.fc_norm", "head", b * d, b * d, flops_per=_LN_FLOPS, bwd=(2 * b * d, b * d))
            o.autocast_cast("head.fc_norm", "head", b * d)
        o.matmul("head.fc", "head", b, d, c)
    o.elem("cls_loss.cross_entropy", "cls_loss", 2 * b * c, b * c, flops_per=_SOFTMAX_FLOPS, bwd=(2 * b * c, b * c),
           elem_bytes=4.0)


def _optimizer(o: _Ops, cfg: Config, fused: bool) -> None:
    """AdamW over all trainable parameters with fp32 master weights and moments, plus grad-norm clipping.

    Fused (one kernel): read p, g, m, v and write p, m, v in fp32 (28 B/param), plus writing the bf16/fp16
    weight copy when training in low precision (+2 B). fastsupmae on a CPU (kernels 'torch') runs the same fused
    AdamW (torch's ``fused=True``, the trainer's GuardedAdamW) on fp32 masters; in low precision the bf16
    gradients are copied into fp32 (read 2 + write 4 B) and the updated masters back to bf16 (read 4 + write 2 B).
    Reference ``torch.optim.AdamW`` (foreach on a GPU, its per-tensor loop on a CPU, the same passes): decay,
    lerp, mul, addcmul, sqrt, div, add, addcdiv, each a pass: 20 fp32 tensor reads + writes per parameter.
    Under autocast the reference also casts every fp32 weight to bf16 once per forward (read 4 + write 2 B)
    and its bf16 weight gradients are accumulated into fp32 .grad (read 2 + write 4 B).
    """
    n = float(param_count(cfg))
    low = o.db < 4
    if fused:  # low precision: + the bf16 weight copy (GPU kernel), + grads in and weights out (CPU, torch)
        extra = (12.0 if o.kernels == "torch" else 2.0) if low else 0.0
        o.rows.append(Op("optimizer.adamw_fused", "optimizer", _ADAMW_FLOPS * n, n * (28.0 + extra), False,
                         fp32=True))
    else:
        o.rows.append(Op("optimizer.adamw_foreach", "optimizer", _ADAMW_FLOPS * n, n * 20 * 4.0, False, fp32=True))
        if low:
            o.rows.append(Op("autocast.weight_and_grad_casts", "optimizer", 0.0, n * 6.0, False, 0.0, n * 6.0))
    o.rows.append(Op("optimizer.grad_norm_clip", "optimizer", 3.0 * n, n * 4.0, False, fp32=True))


def ops(
    cfg: Config,
    batch: int = 1,
    dtype_bytes: int = 2,
    fused: bool = True,
    attention: str | None = None,
    autocast: bool | None = None,
    kernels: str = "triton",
) -> list[Op]:
    """Every op of one training step (forward, backward, optimizer) of ``cfg.model.objective``.

    Args:
        cfg: the run configuration (model sizes and objective options from ``cfg.model``).
        batch: images per step on one device, B.
        dtype_bytes: bytes per activation / weight element (2 for bf16, 4 for fp32).
        fused: fastsupmae's path (True) or the unfused MAE-style reference (False); see the module docstring.
        attention: 'sdpa' or 'math' (explicit, scores through memory). Default: the fused path follows
            ``cfg.model.attn_backend`` (sdpa unless it says math; xformers costs as sdpa), the reference is math.
        autocast: low precision by autocast on fp32 weights (fp32 LayerNorm / softmax outputs, casts) rather
            than bf16 weights. Default: the reference (MAE's torch.amp) does, fastsupmae (DeepSpeed bf16) not.
        kernels: the fused path's memory-bound kernels: 'triton' (GPU kernels and a fused AdamW) or 'torch'
            (their pure-torch twins and torch.optim.AdamW: what fastsupmae runs on a CPU). Matmul FLOPs are
            the same either way.
    Returns: op rows in forward execution order, optimizer rows last.
    """
    m = cfg.model
    if attention is None:
        attention = "math" if (not fused or m.attn_backend == "math") else "sdpa"
    if attention not in ("sdpa", "math"):
        raise ValueError(f"attention '{attention}' is not sdpa or math")
    if kernels not in ("triton", "torch"):
        raise ValueError(f"kernels '{kernels}' is not triton or torch")
    o = _Ops(dtype_bytes, attention, (not fused) if autocast is None else autocast, kernels)
    b, n, k, obj = batch, m.num_patches, m.num_keep, m.objective
    if obj == "supervised":
        _patch_embed(o, cfg, b, n, fused)
        _encoder(o, cfg, b, 1 + n, fused)
        _head(o, cfg, b, 1 + n)
    elif obj in ("supmae", "mae"):
        _masking(o, cfg, b)
        _patch_embed(o, cfg, b, k, fused)
        _encoder(o, cfg, b, 1 + k, fused)
        _decoder(o, cfg, b, 1 + k, fused)
        _prediction_and_loss(o, cfg, b, fused)
        if obj == "supmae":
            _head(o, cfg, b, 1 + k)
    elif obj == "mim_supervised":
        _masking(o, cfg, b)
        full_in = m.mim_encoder_input == "full"
        rows = n if full_in else k
        _patch_embed(o, cfg, b, rows, fused, mask_select=full_in)
        _encoder(o, cfg, b, 1 + rows, fused)
        _decoder(o, cfg, b, 1 + rows, fused)
        _prediction_and_loss(o, cfg, b, fused)
        if m.mim_cls_view == "unmasked":  # a second encoder pass on the whole image feeds the classifier
            start = len(o.rows)
            _patch_embed(o, cfg, b, n, fused)
            _encoder(o, cfg, b, 1 + n, fused)
            for i in range(start, len(o.rows)):
                op = o.rows[i]
                o.rows[i] = replace(op, name="unmasked_view." + op.name, stage="unmasked_view." + op.stage)
            _head(o, cfg, b, 1 + n)
        else:
            _head(o, cfg, b, 1 + rows)
    else:
        raise ValueError(f"model.objective '{obj}' has no cost model; expected supmae | mae | supervised | "
                         "mim_supervised")
    _optimizer(o, cfg, fused)
    return o.rows


def forward_flops(cfg: Config, batch: int = 1, fused: bool = True) -> float:
    """Matmul FLOPs (2 per multiply-add) of one training forward pass of ``batch`` images."""
    return sum(op.flops for op in ops(cfg, batch, fused=fused) if op.matmul)


def train_flops(cfg: Config, batch: int = 1, fused: bool = True) -> float:
    """Matmul (model) FLOPs of one training step of ``batch`` images: forward + backward, no recomputation.

    MFU = train_flops(cfg, B) / (step_seconds * peak_flops_per_second).
    """
    return sum(op.flops + op.bwd_flops - op.recompute_flops for op in ops(cfg, batch, fused=fused) if op.matmul)
