"""Synthesis computed exactly as generator.py defines it, faster: warps folded into the lifts,
gains into the weights, a hand-written backward per level, in-place inference and cache-sized
CPU chunks (benchmarks/README.md has the measurements; tests/test_generator.py the equality).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# Elements (rows x C) of one chunk of pixels on the CPU: a chunk's activations stay in a
# core's L2 cache while all levels run over it (256 rows at C = 1024; benchmarks/README.md
# has the measurements). A GPU takes the whole batch at once.
CPU_CHUNK_ELEMENTS = 256 * 1024


def render(synthesis, ws: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """ws (B, L, w_dim), coords (P, 2) -> RGB (B, P, 3), as `synthesis` renders with fast=False.

    Under autocast the C x C matmuls run in the autocast dtype; the coordinate lifts stay in
    float32.
    """
    device = ws.device
    dtype = synthesis.to_rgb.weight.dtype
    autocast = torch.is_autocast_enabled(device.type)
    fast = torch.get_autocast_dtype(device.type) if autocast else dtype
    x0 = coords.to(device, dtype)  # (P, 2)
    clamp = synthesis.clamp
    with torch.autocast(device.type, enabled=False):
        lifts = _lifts(synthesis.levels, ws.to(dtype))  # (L, B, 3, C)
        mixing = [tuple(t.to(fast) for t in _mixing(level)) for level in synthesis.levels]
        to_rgb = synthesis.to_rgb
        rgb = to_rgb.weight.t().to(fast), to_rgb.bias.to(fast)  # (C, 3), (3,)
        if torch.is_grad_enabled() or device.type != "cpu":
            inplace = not torch.is_grad_enabled()
            checkpoint = synthesis.checkpoint_levels and torch.is_grad_enabled()
            out = _render(x0, lifts, mixing, rgb, clamp, inplace, checkpoint)
        else:
            rows = (synthesis.chunk_elements or CPU_CHUNK_ELEMENTS) // synthesis.hidden
            out = _render_chunked(x0, lifts, mixing, rgb, clamp, max(rows, 1))
    return out.to(dtype)  # (B, P, 3)


def _lifts(levels, ws: torch.Tensor) -> torch.Tensor:
    """ws (B, L, w_dim) -> each level's lift as a map of the *input* coordinates (L, B, 3, C).

    The warp is cumulative, x_i = x_{i-1} M_i + b_i, so x_i = x_0 Mc_i + bc_i with
    Mc_i = Mc_{i-1} M_i and bc_i = bc_{i-1} M_i + b_i; the lift g_i = x_i A_i + a_i is then
    [x_0, 1] @ [[Mc_i A_i], [bc_i A_i + a_i]]: one small matmul per level and pixel block.
    """
    out, mc, bc = [], None, None
    for i, level in enumerate(levels):
        warp, shift, lift, lift_bias = level.heads(ws[:, i])
        mc, bc = (warp, shift) if i == 0 else (mc @ warp, torch.baddbmm(shift, bc, warp))
        out.append(torch.cat([mc @ lift, torch.baddbmm(lift_bias, bc, lift)], dim=1))
    return torch.stack(out)  # (L, B, 3, C)


def _mixing(level) -> tuple[torch.Tensor, torch.Tensor]:
    """A level's C x C layer with its gains folded in: weight (C_in, C_out), bias (C,).

    lrelu is positively homogeneous, so lrelu(y) * sqrt(2) = lrelu(sqrt(2) * y): the
    equalized layer's bias_act gain costs nothing at run time.
    """
    lin, gain = level.linear, level.gain
    if isinstance(lin, nn.Linear):
        return lin.weight.t(), lin.bias
    return (lin.weight * (lin.weight_gain * gain)).t(), lin.bias * (lin.lr_mult * gain)


def _map_chunks(fn, chunks, device: torch.device) -> None:
    """Call fn on every chunk; on the CPU spread over the intra-op threads, one chunk each.

    Each worker runs its chunks single-threaded (torch.set_num_threads sets the calling
    thread's OpenMP and MKL teams), so no op waits at a barrier for another core: on busy,
    shared cores those waits cost more than the work (benchmarks/README.md).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or len(chunks) == 1:
        for chunk in chunks:
            fn(chunk)
        return
    try:
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for _ in pool.map(fn, chunks):
                pass
    finally:
        torch.set_num_threads(threads)  # also resets the default that new threads read


def _render_chunked(x0, lifts, mixing, rgb, clamp: float, rows: int):
    """_render over blocks of samples x pixels of `rows` rows, on all CPU threads."""
    B, P = lifts.shape[1], x0.shape[0]
    n_p = min(P, rows)
    n_b = max(min(B, rows // n_p), 1)
    out = torch.empty(B, P, 3, device=x0.device, dtype=rgb[0].dtype)
    inference = torch.is_inference_mode_enabled()

    def render_block(block):
        b, p = block
        # Grad mode and inference mode are per thread: carry the caller's over.
        with torch.inference_mode(inference), torch.no_grad():
            x, lift = x0[p : p + n_p], lifts[:, b : b + n_b]
            out[b : b + n_b, p : p + n_p] = _render(x, lift, mixing, rgb, clamp, True, False)

    blocks = [(b, p) for b in range(0, B, n_b) for p in range(0, P, n_p)]
    _map_chunks(render_block, blocks, x0.device)
    return out  # (B, P, 3)


def _render(x0, lifts, mixing, rgb, clamp: float, inplace: bool, checkpoint: bool):
    """x0 (P, 2), lifts (L, B, 3, C) -> RGB (B, P, 3); in-place products when no grad."""
    B, P = lifts.shape[1], x0.shape[0]
    x = torch.cat([x0, x0.new_ones(P, 1)], dim=1).expand(B, P, 3)  # (B, P, 3)
    h = None
    for lift, (weight, bias) in zip(lifts, mixing, strict=True):
        if checkpoint:
            # train.checkpoint_levels: recompute the level in backward instead of keeping it.
            h = torch.utils.checkpoint.checkpoint(
                _level, x, h, lift, weight, bias, clamp, inplace, use_reentrant=False
            )
        else:
            h = _level(x, h, lift, weight, bias, clamp, inplace)
    return torch.addmm(rgb[1], h, rgb[0]).view(B, P, 3)


def _level(x, h, lift, weight, bias, clamp: float, inplace: bool):
    """One level on (B*P, C) rows: x (B, P, 3), h (B*P, C) or None -> h (B*P, C).

    With autograd (inplace=False) through _TrainingLevel; without, in place on the rows.
    """
    if not inplace:
        return _TrainingLevel.apply(x, h, lift, weight, bias, clamp)
    B, P, C = x.shape[0], x.shape[1], lift.shape[2]
    # The lift g_i = x_i A_i + a_i (warp folded in, see _lifts).
    g = torch.bmm(x, lift).view(B * P, C)  # (B*P, C)
    # h <- h * lrelu(g): one order higher (level 0 starts the polynomial with g).
    h = g if h is None else h.mul_(F.leaky_relu_(g, 0.2))
    return _bias_act_(torch.addmm(bias, h.to(weight.dtype), weight), clamp)


def _bias_act_(z: torch.Tensor, clamp: float) -> torch.Tensor:
    """StyleGAN's bias_act after the C x C product, in place: clamp(lrelu(z), -c, c)."""
    return F.leaky_relu_(z, 0.2).clamp_(-clamp, clamp)


class _TrainingLevel(torch.autograd.Function):
    """One level under autograd, h' = clamp(lrelu((h * lrelu(x L)) W + b)), hand-differentiated.

    Autograd on the same in-place ops copies the pre-clamp activations in forward and, in
    backward, replays the in-place lrelu on the lift's view (a clone, copies, a zero fill)
    and rebuilds the clamp's mask: about eight extra passes over (B*P, C) per level. Here
    backward reads the activation's slope from its output, and a level keeps three
    (B*P, C) tensors instead of four: lrelu(g), the matmul input m and the output (h is
    the previous level's output). Under autocast m, W, b and h' are in the fast dtype,
    the lift and its gradient in float32.
    """

    @staticmethod
    def forward(ctx, x, h, lift, weight, bias, clamp: float):
        B, P, C = x.shape[0], x.shape[1], lift.shape[2]
        g = torch.bmm(x, lift).view(B * P, C)  # (B*P, C) the lift
        a = None if h is None else F.leaky_relu_(g, 0.2)
        m = (g if h is None else h * a).to(weight.dtype)  # (B*P, C)
        y = _bias_act_(torch.addmm(bias, m, weight), clamp)  # (B*P, C)
        ctx.save_for_backward(x, h, lift, a, m, weight, y)
        ctx.clamp = clamp
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, lift, a, m, weight, y = ctx.saved_tensors
        B, P, C = x.shape[0], x.shape[1], lift.shape[2]
        need_x, _, _, need_weight, need_bias, _ = ctx.needs_input_grad
        # y = clamp(lrelu(z), -c, c): dy/dz is 0 where |y| >= c, else 1 where y > 0 and
        # 0.2 where y <= 0 (lrelu keeps the sign). Two fused passes, no saved z. (At
        # |lrelu(z)| == c exactly torch.clamp passes the gradient; here it is 0.)
        grad_z = torch.ops.aten.hardtanh_backward(grad_y, y, -ctx.clamp, ctx.clamp)
        grad_z = torch.ops.aten.leaky_relu_backward(grad_z, y, 0.2, True)
        grad_weight = m.t() @ grad_z if need_weight else None  # (C_in, C_out)
        grad_bias = grad_z.sum(0) if need_bias else None
        grad_m = (grad_z @ weight.t()).to(lift.dtype)  # (B*P, C), a fresh buffer
        if h is None:
            grad_g, grad_h = grad_m, None
        else:
            # m = h * a with a = lrelu(g): dm/dh = a, dm/dg = h * lrelu'(g); a > 0 iff g > 0.
            grad_g = torch.ops.aten.leaky_relu_backward(grad_m * h, a, 0.2, True)
            grad_h = grad_m.mul_(a).to(h.dtype)
        grad_g = grad_g.view(B, P, C)
        grad_lift = torch.bmm(x.transpose(1, 2), grad_g)  # (B, 3, C)
        grad_x = torch.bmm(grad_g, lift.transpose(1, 2)) if need_x else None  # (B, P, 3)
        return grad_x, grad_h, grad_lift, grad_weight, grad_bias, None
