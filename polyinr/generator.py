"""Poly-INR generator: a mapping network and a per-pixel polynomial MLP.

docs/model.md section 2; the paper, section 3.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from polyinr.config import GeneratorConfig


def coordinate_grid(resolution: int, device=None) -> torch.Tensor:
    """The default pixel coordinates of an R x R image: (R, R, 2), (row, col) in [0, 1]."""
    a = torch.arange(resolution, dtype=torch.float32, device=device) / max(resolution - 1, 1)
    return torch.stack(torch.meshgrid(a, a, indexing="ij"), dim=-1)  # (R, R, 2)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class EqualizedLinear(nn.Module):
    """StyleGAN's fully connected layer with an equalised learning rate."""

    def __init__(self, in_features, out_features, lr_mult=1.0, activation=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.weight_gain = lr_mult / math.sqrt(in_features)
        self.lr_mult = lr_mult
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mult)
        return _lrelu(x) * math.sqrt(2) if self.activation else x


def _normalize_2nd_moment(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class MappingNetwork(nn.Module):
    """z (and a class) -> one w per level, with a per-class running average for truncation."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.levels = cfg.levels
        self.w_avg_beta = cfg.w_avg_beta
        if cfg.conditional:
            self.embed = nn.Embedding(cfg.num_classes, cfg.embed_dim)
            # The class projection has StyleGAN's lrelu (gain sqrt 2), as the reference.
            self.embed_fc = EqualizedLinear(cfg.embed_dim, cfg.cond_dim, activation=True)
            in_dim = cfg.z_dim + cfg.cond_dim
        else:
            self.embed = None
            in_dim = cfg.z_dim
        self.fc = nn.ModuleList(
            [
                EqualizedLinear(in_dim, cfg.w_dim, cfg.mapping_lr_mult, activation=True),
                EqualizedLinear(cfg.w_dim, cfg.w_dim, cfg.mapping_lr_mult, activation=True),
            ]
        )
        rows = cfg.num_classes if cfg.conditional else 1
        self.register_buffer("w_avg", torch.zeros(rows, cfg.w_dim))

    def forward(self, z, c=None, psi=1.0, update_w_avg=False):
        """z (B, z_dim), c (B,) int64 or None -> ws (B, levels, w_dim)."""
        x = _normalize_2nd_moment(z)
        if self.embed is not None:
            if c is None:
                raise ValueError("a conditional generator needs class labels c")
            y = _normalize_2nd_moment(self.embed_fc(self.embed(c)))
            x = torch.cat([x, y], dim=1)  # (B, z_dim + cond_dim)
        for layer in self.fc:
            x = layer(x)  # (B, w_dim)
        rows = (
            c if self.embed is not None else torch.zeros(len(z), dtype=torch.long, device=z.device)
        )
        if update_w_avg:
            self._update_w_avg(x.detach(), rows)
        if psi != 1.0:
            # Truncation towards the class average: w = lerp(w_avg[c], w, psi).
            x = torch.lerp(self.w_avg[rows], x, psi)
        return x.unsqueeze(1).repeat(1, self.levels, 1)  # (B, L, w_dim)

    @torch.no_grad()
    def _update_w_avg(self, w: torch.Tensor, rows: torch.Tensor) -> None:
        classes, inverse = torch.unique(rows, return_inverse=True)
        sums = torch.zeros(len(classes), w.shape[1], device=w.device).index_add_(0, inverse, w)
        counts = torch.bincount(inverse, minlength=len(classes)).unsqueeze(1)
        means = sums / counts
        self.w_avg[classes] = torch.lerp(means, self.w_avg[classes], self.w_avg_beta)


HEAD_WEIGHT_GAIN = 0.25


def _init_heads(affine: nn.Linear, hidden: int) -> None:
    """Start every level near the identity: warp M = I, lift bias a = 1, small weights.

    The paper does not fix the init (docs/differences.md). With PyTorch's default init the
    ten multiplicative factors
    lrelu(g_i) have E[lrelu(g)^2] well below 1, so the output of a typical sample vanishes
    (median RMS 0.04 at C=128, 0.01 at C=1024) while a few explode, and the cumulative warp
    contracts the coordinates 40-fold. Gates that start at 1 (as StyleGAN2 starts its style
    affines at bias 1) with head weights at a quarter of the default scale give a median
    RMS of 0.6 at both widths, a light tail and visible spatial structure at step 0.
    """
    with torch.no_grad():
        affine.weight.mul_(HEAD_WEIGHT_GAIN)
        affine.bias[:4] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # warp M, row-major 2x2
        affine.bias[6 + 2 * hidden :] = 1.0  # lift bias a


class PolyLevel(nn.Module):
    """One level's weights: heads that warp and lift the coordinates, and the C x C mixing."""

    def __init__(self, w_dim: int, hidden: int, first: bool, clamp: float, mixing: str):
        super().__init__()
        self.hidden = hidden
        self.clamp = clamp
        # Level 0 reads w directly; later levels read u = FC_lrelu(w_i) (C wide).
        self.style = None if first else EqualizedLinear(w_dim, hidden, activation=True)
        head_in = w_dim if first else hidden
        # The four plain linear heads of docs/model.md section 2 (warp M 2x2, shift b 2,
        # lift A 2xC, lift bias a C) fused into one nn.Linear: identical parameters and init,
        # one matmul.
        self.affine = nn.Linear(head_in, 4 + 2 + 2 * hidden + hidden)
        _init_heads(self.affine, hidden)
        # Channel mixing, then lrelu (gain sqrt 2 when equalized) and the clamp.
        if mixing == "plain":
            self.linear = nn.Linear(hidden, hidden)
        else:
            self.linear = EqualizedLinear(hidden, hidden, activation=True)

    def forward(self, w):
        """w (B, w_dim) -> warp M (B, 2, 2), shift b (B, 1, 2), lift A (B, 2, C), a (B, 1, C)."""
        B, C = w.shape[0], self.hidden
        u = w if self.style is None else self.style(w)
        params = self.affine(u)  # (B, 6 + 3C)
        warp = params[:, :4].view(B, 2, 2)
        shift = params[:, 4:6].view(B, 1, 2)
        lift = params[:, 6 : 6 + 2 * C].view(B, 2, C)
        lift_bias = params[:, 6 + 2 * C :].view(B, 1, C)
        return warp, shift, lift, lift_bias

    def mixing(self):
        """The C x C layer with its gains folded in: weight (C_in, C_out), bias (C,).

        lrelu is positively homogeneous, so lrelu(y) * sqrt(2) = lrelu(sqrt(2) * y): the
        equalized layer's bias_act gain costs nothing at run time.
        """
        lin = self.linear
        if isinstance(lin, nn.Linear):
            return lin.weight.t(), lin.bias
        gain = math.sqrt(2)
        return (lin.weight * (lin.weight_gain * gain)).t(), lin.bias * (lin.lr_mult * gain)


# Elements (rows x C) of one chunk of pixels on the CPU: a chunk's activations stay in a
# core's L2 cache while all levels run over it (256 rows at C = 1024; benchmarks/README.md
# has the measurements). A GPU takes the whole batch at once.
CPU_CHUNK_ELEMENTS = 256 * 1024


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


class Synthesis(nn.Module):
    """Per-pixel MLP: coordinates and one w per level -> RGB at those coordinates."""

    def __init__(self, cfg: GeneratorConfig, resolution: int):
        super().__init__()
        self.levels = nn.ModuleList(
            [
                PolyLevel(cfg.w_dim, cfg.hidden, i == 0, cfg.clamp, cfg.mixing)
                for i in range(cfg.levels)
            ]
        )
        self.to_rgb = nn.Linear(cfg.hidden, 3)  # a 1x1 conv with bias
        self.hidden = cfg.hidden
        self.clamp = cfg.clamp
        # Inference on the CPU renders chunks of this many rows x C (None: the default);
        # a run-time setting that changes speed only, never the images.
        self.chunk_elements: int | None = None
        # Training: recompute each level in the backward pass instead of keeping its
        # activations (train.checkpoint_levels); memory for compute, same gradients.
        self.checkpoint_levels = False
        self.set_resolution(resolution)

    def set_resolution(self, resolution: int) -> None:
        """Swap the default coordinate grid (a fixed input, never a trained parameter)."""
        self.resolution = resolution
        device = self.to_rgb.weight.device
        self.register_buffer("grid", coordinate_grid(resolution, device), persistent=False)

    def lifts(self, ws):
        """ws (B, L, w_dim) -> each level's lift as a map of the *input* coordinates (L, B, 3, C).

        The warp is cumulative, x_i = x_{i-1} M_i + b_i, so x_i = x_0 Mc_i + bc_i with
        Mc_i = Mc_{i-1} M_i and bc_i = bc_{i-1} M_i + b_i; the lift g_i = x_i A_i + a_i is then
        [x_0, 1] @ [[Mc_i A_i], [bc_i A_i + a_i]]: one small matmul per level and pixel block.
        """
        out, mc, bc = [], None, None
        for i, level in enumerate(self.levels):
            warp, shift, lift, lift_bias = level(ws[:, i])
            mc, bc = (warp, shift) if i == 0 else (mc @ warp, torch.baddbmm(shift, bc, warp))
            out.append(torch.cat([mc @ lift, torch.baddbmm(lift_bias, bc, lift)], dim=1))
        return torch.stack(out)  # (L, B, 3, C)

    def forward(self, ws, coords=None):
        """ws (B, L, w_dim), coords (..., 2) shared by the batch -> RGB (B, 3, ...).

        With coords=None the default grid (R, R, 2) gives images (B, 3, R, R). The output
        has no activation: real images live in [-1, 1]. Under autocast the C x C matmuls run
        in the autocast dtype; the coordinate lifts stay in float32.
        """
        B, device = ws.shape[0], ws.device
        dtype = self.to_rgb.weight.dtype
        autocast = torch.is_autocast_enabled(device.type)
        fast = torch.get_autocast_dtype(device.type) if autocast else dtype
        coords = self.grid if coords is None else coords
        x0 = coords.reshape(-1, 2).to(device, dtype)  # (P, 2)
        with torch.autocast(device.type, enabled=False):
            lifts = self.lifts(ws.to(dtype))  # (L, B, 3, C)
            mixing = [tuple(t.to(fast) for t in level.mixing()) for level in self.levels]
            rgb = self.to_rgb.weight.t().to(fast), self.to_rgb.bias.to(fast)  # (C, 3), (3,)
            if torch.is_grad_enabled() or device.type != "cpu":
                out = self._render(x0, lifts, mixing, rgb, inplace=not torch.is_grad_enabled())
            else:
                out = self._render_chunked(x0, lifts, mixing, rgb)
        return out.to(dtype).transpose(1, 2).reshape(B, 3, *coords.shape[:-1])

    def _render_chunked(self, x0, lifts, mixing, rgb):
        """_render over blocks of samples x pixels that fit in cache, on all CPU threads."""
        B, P = lifts.shape[1], x0.shape[0]
        rows = max((self.chunk_elements or CPU_CHUNK_ELEMENTS) // self.hidden, 1)
        n_p = min(P, rows)
        n_b = max(min(B, rows // n_p), 1)
        out = torch.empty(B, P, 3, device=x0.device, dtype=rgb[0].dtype)
        inference = torch.is_inference_mode_enabled()

        def render(block):
            b, p = block
            # Grad mode and inference mode are per thread: carry the caller's over.
            with torch.inference_mode(inference), torch.no_grad():
                x, lift = x0[p : p + n_p], lifts[:, b : b + n_b]
                out[b : b + n_b, p : p + n_p] = self._render(x, lift, mixing, rgb, inplace=True)

        _map_chunks(render, [(b, p) for b in range(0, B, n_b) for p in range(0, P, n_p)], x0.device)
        return out  # (B, P, 3)

    def _render(self, x0, lifts, mixing, rgb, inplace: bool):
        """x0 (P, 2), lifts (L, B, 3, C) -> RGB (B, P, 3); in-place products when no grad."""
        B, P = lifts.shape[1], x0.shape[0]
        x = torch.cat([x0, x0.new_ones(P, 1)], dim=1).expand(B, P, 3)  # (B, P, 3)
        checkpoint = self.checkpoint_levels and torch.is_grad_enabled()
        h = None
        for lift, (weight, bias) in zip(lifts, mixing, strict=True):
            if checkpoint:
                h = torch.utils.checkpoint.checkpoint(
                    self._level, x, h, lift, weight, bias, inplace, use_reentrant=False
                )
            else:
                h = self._level(x, h, lift, weight, bias, inplace)
        return torch.addmm(rgb[1], h, rgb[0]).view(B, P, 3)

    def _level(self, x, h, lift, weight, bias, inplace: bool):
        """One level on (B*P, C) rows: x (B, P, 3), h (B*P, C) or None -> h (B*P, C).

        With autograd (inplace=False) through _TrainingLevel; without, in place on the rows.
        """
        if not inplace:
            return _TrainingLevel.apply(x, h, lift, weight, bias, self.clamp)
        B, P, C = x.shape[0], x.shape[1], self.hidden
        # The lift g_i = x_i A_i + a_i (warp folded in, see lifts()).
        g = torch.bmm(x, lift).view(B * P, C)  # (B*P, C)
        # h <- h * lrelu(g): one order higher (level 0 starts the polynomial with g).
        h = g if h is None else h.mul_(F.leaky_relu_(g, 0.2))
        return _bias_act_(torch.addmm(bias, h.to(weight.dtype), weight), self.clamp)


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


class Generator(nn.Module):
    """Class-conditional Poly-INR: (z, c) -> image; any resolution or coordinate set."""

    def __init__(self, cfg: GeneratorConfig, resolution: int):
        super().__init__()
        self.cfg = cfg
        self.mapping = MappingNetwork(cfg)
        self.synthesis = Synthesis(cfg, resolution)

    @property
    def resolution(self) -> int:
        return self.synthesis.resolution

    def forward(self, z, c=None, psi=1.0, coords=None, update_w_avg=False):
        """z (B, z_dim), c (B,) -> images (B, 3, R, R) in about [-1, 1] (or (B, 3, ...))."""
        ws = self.mapping(z, c, psi=psi, update_w_avg=update_w_avg)
        return self.synthesis(ws, coords)


def parameter_counts(g: Generator) -> dict:
    """Trainable parameters per part, as `polyinr summary` reports them."""

    def n(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    levels = [n(level) for level in g.synthesis.levels]
    counts = {"mapping": n(g.mapping), "levels": levels, "to_rgb": n(g.synthesis.to_rgb)}
    counts["total"] = counts["mapping"] + sum(levels) + counts["to_rgb"]
    return counts


def macs_per_image(cfg: GeneratorConfig, resolution: int) -> int:
    """Multiply-adds of one synthesis pass (the per-pixel MLP dominates; mapping excluded)."""
    C, P = cfg.hidden, resolution * resolution
    per_pixel = cfg.levels * (2 * 2 + 2 * C + C * C) + 3 * C
    per_image_heads = cfg.w_dim * (6 + 3 * C) + (cfg.levels - 1) * (cfg.w_dim * C + C * (6 + 3 * C))
    return P * per_pixel + per_image_heads


def seed_latents(seeds, z_dim: int, device=None) -> torch.Tensor:
    """One z per integer seed, independent of batch composition: (N, z_dim)."""
    z = np.stack([np.random.RandomState(s).randn(z_dim) for s in seeds])
    return torch.from_numpy(z).float().to(device)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 via (x + 1) * 127.5, as samples are exported."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def render_grid(g: Generator, classes, seeds, psi: float, rows: int, resolution=None) -> np.ndarray:
    """Samples for paired (class, seed) lists as one uint8 (H, W, 3) grid of `rows` rows."""
    device = next(g.parameters()).device
    c = torch.as_tensor(classes, dtype=torch.long, device=device)
    z = seed_latents(seeds, g.cfg.z_dim, device)
    coords = None if resolution is None else coordinate_grid(resolution, device)
    images = to_uint8(g(z, c if g.cfg.conditional else None, psi=psi, coords=coords)).cpu()
    n, _, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.zeros(3, rows * h, cols * w, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        canvas[:, r * h : (r + 1) * h, k * w : (k + 1) * w] = image
    return canvas.permute(1, 2, 0).numpy()


def save_generator(g: Generator, path: str | Path, meta: dict) -> None:
    """The exported (EMA) generator: weights, its config and metadata, loadable safely."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"config": dataclasses.asdict(g.cfg), "g_ema": g.state_dict(), "meta": dict(meta)}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_generator(path: str | Path, device=None) -> tuple[Generator, dict]:
    """Load an exported generator (weights only, never pickled code) -> (G in eval mode, meta)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `polyinr train` first")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # The file carries its own shape; a file of another polyinr version fails in one line.
    known = {f.name for f in dataclasses.fields(GeneratorConfig)}
    if set(state["config"]) != known:
        unknown, lacking = (
            sorted(set(state["config"]) - known),
            sorted(known - set(state["config"])),
        )
        raise ValueError(
            f"{path} comes from another polyinr version: its generator config has "
            f"{unknown or 'no extra'} keys and lacks {lacking or 'none'} of this version's"
        )
    cfg = GeneratorConfig(**state["config"])
    g = Generator(cfg, state["meta"]["resolution"])
    try:
        g.load_state_dict(state["g_ema"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ValueError(
            f"{path}: its weights do not fit this polyinr's generator ({first})"
        ) from None
    return g.to(device).eval().requires_grad_(False), state["meta"]
