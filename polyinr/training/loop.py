"""The training loop: one progressive stage of G and D steps, counted in images, reading and
writing one State (EDM2's training_loop shape). The run around it (storage, resume, MLflow,
export) is polyinr/training/run.py.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import sys

import numpy as np
import torch
from tqdm import tqdm

from polyinr import data
from polyinr.core import distributed
from polyinr.core.config import nimg
from polyinr.core.errors import Preempted
from polyinr.model import augment, loss, sampling
from polyinr.model.discriminator import ProjectedDiscriminator, head_accuracy
from polyinr.model.generator import Generator
from polyinr.training import tracking
from polyinr.training.checkpoints import snapshot_name, tensors_sha256
from polyinr.training.rundir import RunDir

# train.precision -> the autocast dtype of the G and D forward passes (None: plain fp32).
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# Under torchrun, ranks agree on SIGTERM (an all-reduce) every this many steps, not every
# step; a stop still lands on a step boundary with a checkpoint, so resume stays exact.
STOP_EVERY = 8
# SIGTERM: how long each checkpoint upload may take before it is left unfinished (schedulers
# give ~30 s); a rerun resumes from it if it landed, else from the commit before.
PREEMPT_WAIT_S = 10.0
CURVE_KEYS = ("kimg", "stage", "resolution")  # a curve row's position, the rest are numbers


def configure_backends() -> None:
    """All torch.backends flags, in one place: fp32 everywhere, TF32 off, as the reference."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True


@torch.no_grad()
def _update_ema(g_ema: Generator, g: Generator, beta: float) -> None:
    for p_ema, p in zip(g_ema.parameters(), g.parameters(), strict=True):
        p_ema.lerp_(p, 1.0 - beta)
    for b_ema, b in zip(g_ema.buffers(), g.buffers(), strict=True):
        b_ema.copy_(b)


def training_step(
    g, d, opt_g, opt_d, reals, z_g, z_d, sigma: float, world: int = 1, precision: str = "fp32"
) -> dict:
    """One G step then one D step; returns this rank's losses and D's per-head accuracy.

    reals: per accumulation round, (images (b, 3, R, R) in [-1, 1], labels (b,));
    z_g, z_d: per round, the latents (b, z_dim) of the G and the D step. Each round's loss
    is divided by the number of rounds, so accumulated gradients are the mean over the batch.
    Returns tensors on the device, read by nobody until the loop logs (no host sync):
    {"loss_g": (), "loss_d": (), "acc_real": (heads,), "acc_fake": (heads,)}, where an
    accuracy is the share of patch logits on the right side of 0 (0.5: D at chance).
    """
    rounds = len(reals)
    dtype = DTYPES[precision]
    amp = torch.autocast(reals[0][0].device.type, dtype or torch.float32, dtype is not None)
    g_params = list(g.parameters())
    d_params = [p for p in d.parameters() if p.requires_grad]

    # G step: hinge loss of D on blurred fakes; D's parameters get no gradient.
    d.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    loss_g = 0.0
    for (_, c), z in zip(reals, z_g, strict=True):
        with amp:
            logits = d(augment.blur(g(z, c), sigma), c)
        lg = loss.g_hinge(logits) / rounds
        lg.backward()
        loss_g = loss_g + lg.detach()
    distributed.all_reduce_grads(g_params, world)
    opt_g.step()

    # D step: hinge loss on blurred reals and fakes.
    for p in d_params:
        p.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    loss_d, acc_real, acc_fake = 0.0, 0.0, 0.0
    for (x, c), z in zip(reals, z_d, strict=True):
        with amp:
            with torch.no_grad():
                fake = augment.blur(g(z, c), sigma)
            real_logits, fake_logits = d(augment.blur(x, sigma), c), d(fake, c)
        ld = loss.d_hinge(real_logits, fake_logits) / rounds
        ld.backward()
        loss_d = loss_d + ld.detach()
        real_acc, fake_acc = head_accuracy(real_logits, fake_logits)
        acc_real, acc_fake = acc_real + real_acc / rounds, acc_fake + fake_acc / rounds
    distributed.all_reduce_grads(d_params, world)
    opt_d.step()
    return {"loss_g": loss_g, "loss_d": loss_d, "acc_real": acc_real, "acc_fake": acc_fake}


@dataclasses.dataclass
class State:
    """Everything a checkpoint holds: the stage's models and optimisers, and where the run is."""

    g: Generator
    g_ema: Generator
    d: ProjectedDiscriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    stage: int  # index into train.stages
    cur_nimg: int  # images seen since the start of the run
    history: list[dict]  # a row per snapshot: losses, D's accuracy, the FID when measured
    mlflow_run_id: str | None
    config: dict  # the params the run was made with (params.to_dict)
    data_position: tuple[int, int] = (0, 0)  # (epoch, batches served) of this rank's loader

    def state_dict(self, rng: list[dict]) -> dict:
        """The checkpoint: weights_only-safe types; `rng` holds every rank's RNG states."""
        return {
            "G": self.g.state_dict(),
            "G_ema": self.g_ema.state_dict(),
            "D": self.d.trainable_state_dict(),
            "opt_G": self.opt_g.state_dict(),
            "opt_D": self.opt_d.state_dict(),
            "stage": self.stage,
            "cur_nimg": self.cur_nimg,
            "history": self.history,
            "mlflow_run_id": self.mlflow_run_id,
            "config": self.config,
            "data_position": list(self.data_position),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint of this stage (RNG states are per rank: see run._resume)."""
        self.g.load_state_dict(state["G"])
        self.g_ema.load_state_dict(state["G_ema"])
        self.d.load_trainable_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_G"])
        self.opt_d.load_state_dict(state["opt_D"])
        self.stage, self.cur_nimg = state["stage"], state["cur_nimg"]
        self.history, self.mlflow_run_id = list(state["history"]), state["mlflow_run_id"]
        self.data_position = tuple(state.get("data_position") or (0, 0))


def schedule(t) -> tuple[list[int], list[int]]:
    """Each stage's first and end cur_nimg. Stages run whole iterations: each one's kimg rounded
    up to a multiple of the batch, so the next starts where this one stopped (its blur and EMA
    ramps from its image 0)."""
    ends = np.cumsum([-(-nimg(s.kimg) // t.batch) * t.batch for s in t.stages]).tolist()
    return [0, *ends[:-1]], ends


def split_batch(t, world: int) -> tuple[int, int]:
    """(per-rank batch, accumulation rounds) of the global batch train.batch over `world`."""
    batch_gpu = t.batch_gpu or t.batch // world
    rounds = t.batch // (batch_gpu * world)
    if rounds < 1 or rounds * batch_gpu * world != t.batch:
        raise ValueError(
            f"train.batch={t.batch} is not a multiple of batch_gpu ({batch_gpu}) "
            f"x world size ({world})"
        )
    return batch_gpu, rounds


def say(run: RunDir, event: str, message: str | None = None, **fields) -> dict:
    """Rank 0's account of what happened: a line of events.jsonl, what MLflow keeps of it, and
    a line for people on stderr."""
    record = run.emit(event, **fields)
    tracking.log_event(record)
    if message:
        tqdm.write(message, file=sys.stderr)
    return record


def training_loop(cfg, state: State, store, run: RunDir, fid, stop, progress: bool) -> None:
    """Train progressive stage state.stage from state.cur_nimg to its end, checkpointing every
    train.snapshot_kimg into `store` (rank 0) and the curves and events into `run`; `fid`: the
    FID during training, or None. Raises Preempted after a checkpoint once `stop` is set."""
    rank, world = distributed.rank_world()
    t, index = cfg.train, state.stage
    resolution, (start, end) = t.stages[index].resolution, [x[index] for x in schedule(t)]
    batch_gpu, rounds = split_batch(t, world)
    device = next(state.g.parameters()).device
    g, g_ema, d = state.g, state.g_ema, state.d
    loader = data.make_loader(
        data.beton_path(cfg.data.out_dir, resolution),
        batch_gpu,
        t.seed + index,
        device,
        mirror=t.mirror,
        distributed=world > 1,
        workers=t.workers,
    )
    position = state.data_position
    if position == (0, 0) and state.cur_nimg > start:  # a checkpoint from before data_position
        position = divmod((state.cur_nimg - start) // t.batch * rounds, len(loader))
    loader.seek(*position)  # continue mid-epoch with the batches not yet consumed
    batches = (batch for _ in iter(int, 1) for batch in loader)  # epoch after epoch
    ema_nimg_full = (t.ema_kimg if t.ema_kimg >= 0 else t.batch * 10 / 32) * 1000
    classes = cfg.generator.class_count
    grid_classes = torch.arange(min(max(classes, 1), 8)).repeat_interleave(8)
    heads = len(d.branches) * 4
    sums, count, steps = torch.zeros(2 + 2 * heads, dtype=torch.float64, device=device), 0, 0
    next_snapshot = _next_tick(state.cur_nimg, t.snapshot_kimg)
    next_sample = _next_tick(state.cur_nimg, t.sample_kimg)
    positions = [distributed.positions(q, rank, world, batch_gpu) for q in range(rounds)]
    fid_name = fid.name if fid else None  # the curve's FID column, named by its sample count
    bar = tqdm(
        total=end - start,
        initial=state.cur_nimg - start,
        unit="img",
        unit_scale=True,  # 1.02k/6.02k img, no float noise
        desc=f"stage {index} ({resolution}px)",
        disable=not progress or rank > 0,
    )
    while state.cur_nimg < end:
        cur_nimg = state.cur_nimg
        distributed.reseed(t.seed, rank, cur_nimg)
        z_g, z_d = distributed.draws(t.seed, cur_nimg, t.batch, cfg.generator.z_dim)
        sigma = augment.blur_sigma(
            cur_nimg - start, cfg.discriminator.blur_sigma, cfg.discriminator.blur_kimg
        )
        reals = [next(batches) for _ in range(rounds)]
        z_g, z_d_local = ([z[pos].to(device) for pos in positions] for z in (z_g, z_d))
        stats = training_step(
            g, d, state.opt_g, state.opt_d, reals, z_g, z_d_local, sigma, world, t.precision
        )
        # The per-class running mean of w (truncation) from the whole global batch, so
        # that it is the same on every rank and for every split of the batch.
        with torch.no_grad():
            labels = distributed.gather_labels([c for _, c in reals], world)
            g.mapping(z_d.to(device), labels, update_w_avg=True)
        cur_nimg = state.cur_nimg = cur_nimg + t.batch
        # EMA with half-life ema_kimg, ramped up as ema_rampup x images seen this stage.
        ema_nimg = ema_nimg_full
        if t.ema_rampup > 0:
            ema_nimg = min(ema_nimg, (cur_nimg - start) * t.ema_rampup)
        _update_ema(g_ema, g, 0.5 ** (t.batch / max(ema_nimg, 1e-8)))
        # Summed on the device; read (one host sync) only at a snapshot.
        sums += torch.cat(
            [
                torch.stack([stats["loss_g"], stats["loss_d"]]).double(),
                stats["acc_real"].double(),
                stats["acc_fake"].double(),
            ]
        )
        count, steps = count + 1, steps + 1
        bar.update(t.batch)
        done = cur_nimg >= end
        if rank == 0 and (cur_nimg >= next_sample or done):
            next_sample = _next_tick(cur_nimg, t.sample_kimg)
            seeds = list(range(8)) * (len(grid_classes) // 8)
            grid = sampling.grid(g_ema, grid_classes, seeds, t.sample_psi, rows=len(seeds) // 8)
            tracking.log_image(grid, key="samples", step=cur_nimg)  # steps are images
            run.write_grid(grid)
        due = cur_nimg >= next_snapshot or done
        stopping = (due or world == 1 or steps % STOP_EVERY == 0) and stop.any_rank(world, device)
        if not (due or stopping):
            continue
        # A snapshot: the curve's row (and the FID when due), then the checkpoint.
        next_snapshot = _next_tick(cur_nimg, t.snapshot_kimg)
        mean = distributed.mean_over_ranks((sums / count).cpu().numpy(), world, device)
        sums, count = torch.zeros_like(sums), 0
        row = _curve_row(cur_nimg, index, resolution, mean, heads, sigma)
        bar.set_postfix(
            loss_g=f"{row['loss_g']:.3f}",
            loss_d=f"{row['loss_d']:.3f}",
            d_acc=f"{(row['acc_real'] + row['acc_fake']) / 2:.2f}",
            refresh=False,
        )
        every = nimg(cfg.eval.every_kimg)
        if fid and not stopping and (done or _fid_due(state.history, fid_name, cur_nimg, every)):
            row[fid_name] = fid(g_ema, resolution)  # all ranks
        state.history.append(row)
        state.data_position = loader.position
        checkpoint = state.state_dict(rng=distributed.all_rng_states(world))
        info = {
            "stage": index,
            "resolution": resolution,
            "kimg": cur_nimg / 1000,
            "weights_sha256": tensors_sha256(g_ema.state_dict()),
        }
        patience = PREEMPT_WAIT_S if stopping else None
        save = functools.partial(store.save, checkpoint, cur_nimg, info, patience)
        uri = distributed.on_rank0(save, rank, world)
        if rank == 0:
            where = {"stage": index, "resolution": resolution, "nimg": cur_nimg}
            numbers = {k: row[k] for k in row if k not in CURVE_KEYS and k != fid_name}
            say(
                run,
                "checkpoint",
                f"kimg {cur_nimg / 1000:g}: loss_g {row['loss_g']:.3f} "
                f"loss_d {row['loss_d']:.3f} D acc real {row['acc_real']:.2f} fake "
                f"{row['acc_fake']:.2f} -> {uri}",
                **where,
                uri=uri,
                metrics=numbers,
            )
            if fid_name in row:
                best = store.mark_best(snapshot_name(cur_nimg), row[fid_name], index)
                say(
                    run,
                    "fid",
                    f"kimg {cur_nimg / 1000:g}: {fid_name} {row[fid_name]:.3f}"
                    + (" (best of the stage)" if best else ""),
                    **where,
                    metric=fid_name,
                    value=row[fid_name],
                    best=best,
                )
            write_curves(state.history, run)
        if stopping:
            bar.close()
            if rank == 0:
                run.emit("preempted", stage=index, nimg=cur_nimg, uri=uri)
            raise Preempted(
                f"stopped by SIGTERM at kimg {cur_nimg / 1000:g}; checkpoint "
                f"{uri or 'not saved (an upload was in flight)'}; rerun the same command to resume"
            )
    bar.close()


def _fid_due(history: list[dict], name: str, cur_nimg: int, every: int) -> bool:
    """Whether an `every`-image boundary was crossed since the curve's last FID (column `name`)."""
    last = max((nimg(r["kimg"]) for r in history if name in r), default=0)
    return cur_nimg // every > last // every


def _next_tick(cur_nimg: int, every_kimg: float) -> int:
    every = max(nimg(every_kimg), 1)
    return (cur_nimg // every + 1) * every


def _curve_row(cur_nimg, stage, resolution, mean, heads: int, sigma: float) -> dict:
    """One row of the training curve from the means of training_step's numbers."""
    real, fake = mean[2 : 2 + heads], mean[2 + heads :]
    row = {
        "kimg": cur_nimg / 1000,
        "stage": stage,
        "resolution": resolution,
        "loss_g": float(mean[0]),
        "loss_d": float(mean[1]),
        "acc_real": float(np.mean(real)),
        "acc_fake": float(np.mean(fake)),
        "blur_sigma": sigma,
    }
    row |= {f"acc_real_{i}": float(a) for i, a in enumerate(real)}
    row |= {f"acc_fake_{i}": float(a) for i, a in enumerate(fake)}
    return row


def write_curves(history: list[dict], run: RunDir) -> None:
    """train.csv (every row, without FIDs) and fid.csv (the rows with one), which `dvc plots`
    and the MLflow run show, and curves.png, the same as a picture."""
    fid_keys = sorted({k for row in history for k in row if k.startswith("fid")})
    losses = [{k: v for k, v in row.items() if k not in fid_keys} for row in history]
    fids = [
        {"kimg": r["kimg"], "stage": r["stage"], "resolution": r["resolution"], k: r[k]}
        for r in history
        for k in fid_keys
        if k in r
    ]
    for path, rows in ((run.train_curve, losses), (run.fid_curve, fids)):
        fields = list(dict.fromkeys(k for row in rows for k in row)) or ["kimg", "stage"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
    run.write_curves_png(history)
