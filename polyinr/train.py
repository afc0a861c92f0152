"""Train Poly-INR with a projected discriminator, stage by stage; rerun the command to resume.

Progress is counted in images (cur_nimg). One iteration is one G step then one D step on
the global batch; gradients are all-reduced by hand across ranks (torchrun), which keeps
the frozen networks and alternating phases out of DDP's unused-parameter bookkeeping.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from polyinr import augment, data, embedding, loss, tracking
from polyinr.discriminator import ProjectedDiscriminator
from polyinr.generator import Generator, render_grid, save_generator
from polyinr.storage import CheckpointStore

GENERATOR_PATH = Path("models/generator.pt")
TRAIN_CURVE = Path("metrics/train.csv")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the progressive schedule: train at `resolution` for `kimg` images."""

    resolution: int
    kimg: float

    def __post_init__(self):
        if self.resolution < 4 or self.kimg <= 0:
            raise ValueError(f"stage needs resolution >= 4 and kimg > 0, got {self}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The recipe: stages, global batch, Adam, EMA, seeds and how often to snapshot."""

    stages: tuple[Stage, ...]
    batch: int
    batch_gpu: int
    lr_g: float
    lr_d: float
    betas: tuple[float, ...]
    eps: float
    ema_kimg: float
    ema_rampup: float
    mirror: bool
    seed: int
    snapshot_kimg: float
    sample_kimg: float
    sample_psi: float
    workers: int
    embed_init: str | None

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages must list at least one {resolution, kimg}")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")
        if self.batch < 1 or self.batch_gpu < 0:
            raise ValueError("batch must be >= 1 and batch_gpu >= 0")


def configure_backends() -> None:
    """All torch.backends flags, in one place: fp32 everywhere, TF32 off, as the reference."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True


def _reseed(seed: int, rank: int, cur_nimg: int) -> None:
    # A resumed run draws what an uninterrupted one would have at the same cur_nimg.
    torch.manual_seed((seed * 1_000_003 + rank * 7_919 + cur_nimg) % (2**63 - 1))


def _all_reduce_grads(params, world: int) -> None:
    """Average gradients over ranks and zero non-finite entries (SPEC: NaN/Inf zeroed)."""
    for p in params:
        if p.grad is None:
            continue
        if world > 1:
            dist.all_reduce(p.grad)
            p.grad /= world
        torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def _update_ema(g_ema: Generator, g: Generator, beta: float) -> None:
    for p_ema, p in zip(g_ema.parameters(), g.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - beta)
    for b_ema, b in zip(g_ema.buffers(), g.buffers(), strict=True):
        b_ema.copy_(b)


def training_step(g, d, opt_g, opt_d, reals, sigma: float, world: int = 1):
    """One G step then one D step over `reals`, a list of (images, labels) accumulation rounds.

    Returns the hinge losses (G, D) of this rank. The D step updates the generator's
    per-class running average of w, as the reference does.
    """
    rounds, z_dim = len(reals), g.cfg.z_dim
    g_params = list(g.parameters())
    d_params = [p for p in d.parameters() if p.requires_grad]

    # G step: hinge loss of D on blurred fakes; D's parameters get no gradient.
    d.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    loss_g = 0.0
    for _, c in reals:
        z = torch.randn(len(c), z_dim, device=c.device)
        lg = loss.g_hinge(d(augment.blur(g(z, c), sigma), c)) / rounds
        lg.backward()
        loss_g += lg.item()
    _all_reduce_grads(g_params, world)
    opt_g.step()

    # D step: hinge loss on blurred reals and fakes.
    for p in d_params:
        p.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    loss_d = 0.0
    for x, c in reals:
        z = torch.randn(len(c), z_dim, device=c.device)
        with torch.no_grad():
            fake = augment.blur(g(z, c, update_w_avg=True), sigma)
        ld = loss.d_hinge(d(augment.blur(x, sigma), c), d(fake, c)) / rounds
        ld.backward()
        loss_d += ld.item()
    _all_reduce_grads(d_params, world)
    opt_d.step()
    return loss_g, loss_d


def _batches(loader):
    """Endless (images, labels) batches, epoch after epoch."""
    while True:
        yield from loader


def _stage_models(cfg, stage: Stage, num_classes: int, device, g_ema_prev):
    """G, G_ema, D and their optimisers for a stage; later stages start from the last EMA."""
    if g_ema_prev is None:
        g = Generator(cfg.generator, stage.resolution).to(device)
        if cfg.train.embed_init:
            # SPEC 2: the class embedding starts from a pretrained classifier, then trains.
            table = embedding.load(
                cfg.train.embed_init, cfg.generator.num_classes, cfg.generator.embed_dim
            )
            with torch.no_grad():
                g.mapping.embed.weight.copy_(table)
    else:
        g = copy.deepcopy(g_ema_prev).train().requires_grad_(True)
        g.synthesis.set_resolution(stage.resolution)
    g_ema = copy.deepcopy(g).eval().requires_grad_(False)
    # Frozen random parts of D (random-weight feature networks, projections) are rebuilt
    # from the seed, so checkpoints only carry what training changes.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        d = ProjectedDiscriminator(cfg.discriminator, stage.resolution, num_classes).to(device)
    t = cfg.train
    opt_g = torch.optim.Adam(g.parameters(), lr=t.lr_g, betas=tuple(t.betas), eps=t.eps)
    d_params = [p for p in d.parameters() if p.requires_grad]
    opt_d = torch.optim.Adam(d_params, lr=t.lr_d, betas=tuple(t.betas), eps=t.eps)
    return g, g_ema, d, opt_g, opt_d


def train(cfg, device: torch.device, progress: bool = True) -> dict:
    """Run (or resume) the whole schedule of cfg.train.stages; returns a summary."""
    from polyinr.config import flatten, to_dict

    configure_backends()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    t = cfg.train
    batch_gpu = t.batch_gpu or t.batch // world
    rounds = t.batch // (batch_gpu * world)
    if rounds < 1 or rounds * batch_gpu * world != t.batch:
        raise ValueError(f"train.batch={t.batch} is not a multiple of batch_gpu x world size")

    store = CheckpointStore(cfg.storage, cfg.tracking.run_name)
    if rank == 0:
        store.check()
    resumed = store.load_latest()
    state = resumed[0] if resumed else None
    if state is None and t.embed_init:
        if not cfg.generator.conditional:
            raise ValueError("train.embed_init needs generator.conditional=true")
        embedding.load(t.embed_init, cfg.generator.num_classes, cfg.generator.embed_dim)
    if state is not None:
        saved = state["config"]
        for section in ("generator", "discriminator"):
            if saved[section] != to_dict(getattr(cfg, section)):
                raise ValueError(
                    f"checkpoint {resumed[1]} was made with a different {section} section; "
                    "use another tracking.run_name or storage.uri to start a new run"
                )
        print(f"resuming from {resumed[1]} at {state['cur_nimg'] / 1000:.1f} kimg", file=sys.stderr)
    cur_nimg = state["cur_nimg"] if state else 0
    history = list(state["history"]) if state else []

    num_classes = cfg.generator.num_classes if cfg.generator.conditional else 0
    run_id = state["mlflow_run_id"] if state else None
    if rank == 0:
        run = tracking.start_run(cfg.tracking, run_id=run_id, params=flatten(cfg))
        run_id = run.info.run_id
        tracking.set_tags({"discriminator.pretrained": str(cfg.discriminator.pretrained)})

    ends = np.cumsum([int(s.kimg * 1000) for s in t.stages]).tolist()
    starts = [0] + ends[:-1]
    grid_classes = torch.arange(min(max(num_classes, 1), 8)).repeat_interleave(8)
    g_ema = None
    for index, stage in enumerate(t.stages):
        if cur_nimg >= ends[index] and not (state and state["stage"] == index):
            continue
        g, g_ema_new, d, opt_g, opt_d = _stage_models(cfg, stage, num_classes, device, g_ema)
        g_ema = g_ema_new
        position = None  # (epoch, batches served) of this rank's loader, when resuming
        if state is not None and state["stage"] == index:
            position = state.get("data_position")
            g.load_state_dict(state["G"])
            g_ema.load_state_dict(state["G_ema"])
            d.load_state_dict(state["D"], strict=False)
            opt_g.load_state_dict(state["opt_G"])
            opt_d.load_state_dict(state["opt_D"])
            state = None
        if cur_nimg >= ends[index]:
            continue
        path = data.beton_path(cfg.data.out_dir, stage.resolution)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `polyinr prepare` first")
        loader = data.make_loader(
            path,
            batch_gpu,
            t.seed + index,
            device,
            mirror=t.mirror,
            distributed=world > 1,
            workers=t.workers,
        )
        if position is None and cur_nimg > starts[index]:  # a checkpoint from before data_position
            position = divmod((cur_nimg - starts[index]) // t.batch * rounds, len(loader))
        if position is not None:
            loader.seek(*position)  # continue mid-epoch with the batches not yet consumed
        batches = _batches(loader)
        ema_nimg_full = (t.ema_kimg if t.ema_kimg >= 0 else t.batch * 10 / 32) * 1000
        bar = tqdm(
            total=ends[index] - starts[index],
            initial=cur_nimg - starts[index],
            unit="kimg",
            unit_scale=1 / 1000,
            desc=f"stage {index} ({stage.resolution}px)",
            disable=not progress or rank > 0,
        )
        sums, count, next_snapshot = np.zeros(2), 0, _next_tick(cur_nimg, t.snapshot_kimg)
        next_sample = _next_tick(cur_nimg, t.sample_kimg)
        while cur_nimg < ends[index]:
            stage_nimg = cur_nimg - starts[index]
            _reseed(t.seed, rank, cur_nimg)
            sigma = augment.blur_sigma(
                stage_nimg, cfg.discriminator.blur_sigma, cfg.discriminator.blur_kimg
            )
            reals = [next(batches) for _ in range(rounds)]
            loss_g, loss_d = training_step(g, d, opt_g, opt_d, reals, sigma, world)
            cur_nimg += t.batch
            # EMA with half-life ema_kimg, ramped up as ema_rampup x images seen this stage.
            ema_nimg = ema_nimg_full
            if t.ema_rampup > 0:
                ema_nimg = min(ema_nimg, (cur_nimg - starts[index]) * t.ema_rampup)
            _update_ema(g_ema, g, 0.5 ** (t.batch / max(ema_nimg, 1e-8)))

            sums += (loss_g, loss_d)
            count += 1
            bar.update(t.batch)
            bar.set_postfix(loss_g=f"{loss_g:.3f}", loss_d=f"{loss_d:.3f}")
            done = cur_nimg >= ends[index]
            if rank == 0 and (cur_nimg >= next_sample or done):
                next_sample = _next_tick(cur_nimg, t.sample_kimg)
                grid = render_grid(
                    g_ema,
                    grid_classes,
                    list(range(8)) * (len(grid_classes) // 8),
                    t.sample_psi,
                    rows=len(grid_classes) // 8,
                )
                tracking.log_image(grid, key="samples", step=cur_nimg // 1000)
            if cur_nimg >= next_snapshot or done:
                next_snapshot = _next_tick(cur_nimg, t.snapshot_kimg)
                mean = sums / max(count, 1)
                sums, count = np.zeros(2), 0
                row = {
                    "kimg": cur_nimg / 1000,
                    "stage": index,
                    "resolution": stage.resolution,
                    "loss_g": float(mean[0]),
                    "loss_d": float(mean[1]),
                    "blur_sigma": sigma,
                }
                history.append(row)
                if rank == 0:
                    tracking.log_metrics(
                        {k: row[k] for k in ("loss_g", "loss_d", "blur_sigma")},
                        step=cur_nimg // 1000 if cur_nimg >= 1000 else 0,
                    )
                    uri = store.save(
                        {
                            "G": g.state_dict(),
                            "G_ema": g_ema.state_dict(),
                            "D": d.trainable_state_dict(),
                            "opt_G": opt_g.state_dict(),
                            "opt_D": opt_d.state_dict(),
                            "cur_nimg": cur_nimg,
                            "stage": index,
                            "data_position": list(loader.position),
                            "history": history,
                            "mlflow_run_id": run_id,
                            "config": to_dict(cfg),
                            "rng": torch.get_rng_state(),
                        },
                        cur_nimg,
                    )
                    tqdm.write(
                        f"kimg {cur_nimg / 1000:.2f}: loss_g {mean[0]:.3f} "
                        f"loss_d {mean[1]:.3f} -> {uri}"
                    )
                if world > 1:
                    dist.barrier()
        bar.close()

    if rank == 0:
        last = t.stages[-1]
        save_generator(
            g_ema,
            GENERATOR_PATH,
            {
                "mlflow_run_id": run_id,
                "cur_nimg": cur_nimg,
                "resolution": last.resolution,
                "discriminator_pretrained": cfg.discriminator.pretrained,
            },
        )
        _write_curve(history, TRAIN_CURVE)
        tracking.log_artifact(TRAIN_CURVE)
        tracking.end_run()
    return {"cur_nimg": cur_nimg, "mlflow_run_id": run_id, "generator": str(GENERATOR_PATH)}


def _next_tick(cur_nimg: int, every_kimg: float) -> int:
    every = max(int(every_kimg * 1000), 1)
    return (cur_nimg // every + 1) * every


def _write_curve(history: list[dict], path: Path) -> None:
    """The training curve as CSV, which `dvc plots` and the MLflow run show."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["kimg", "stage", "resolution", "loss_g", "loss_d", "blur_sigma"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)


def setup_distributed() -> torch.device:
    """Join the torchrun process group if there is one; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")
