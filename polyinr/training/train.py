"""Train Poly-INR with a projected discriminator, stage by stage; rerun the command to resume.

Progress is counted in images (cur_nimg). One iteration is one G step then one D step on
the global batch, split over torchrun ranks and accumulation rounds; every random draw is a
function of (seed, cur_nimg), so a resumed run continues exactly where the last one stopped.
A run is a State saved to `<storage.uri>/<run_name>` and a run folder (polyinr/training/rundir.py).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from polyinr import data
from polyinr.core import config, distributed
from polyinr.core.config import Stage
from polyinr.core.errors import Preempted
from polyinr.core.storage import StorageError
from polyinr.evaluation import metrics
from polyinr.model import augment, loss
from polyinr.model.discriminator import ProjectedDiscriminator, head_accuracy, weights_label
from polyinr.model.generator import Generator, render_grid, save_generator
from polyinr.training import embedding, lease, tracking
from polyinr.training.checkpoints import (
    CheckpointStore,
    NoGoodCheckpoint,
    snapshot_name,
    tensors_sha256,
)
from polyinr.training.rundir import RunDir

# train.precision -> the autocast dtype of the G and D forward passes (None: plain fp32).
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _autocast(device_type: str, precision: str):
    """bf16 autocast for the models' forward passes; losses and optimisers stay in fp32."""
    dtype = DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


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
    Returns {"loss_g", "loss_d", "acc_real": [per head], "acc_fake": [per head]}, where an
    accuracy is the share of patch logits on the right side of 0 (0.5: D at chance).
    """
    rounds = len(reals)
    amp = _autocast(reals[0][0].device.type, precision)
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
        loss_g += lg.item()
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
        loss_d += ld.item()
        real_acc, fake_acc = head_accuracy(real_logits, fake_logits)
        acc_real = acc_real + np.asarray(real_acc) / rounds
        acc_fake = acc_fake + np.asarray(fake_acc) / rounds
    distributed.all_reduce_grads(d_params, world)
    opt_d.step()
    return {
        "loss_g": loss_g,
        "loss_d": loss_d,
        "acc_real": list(map(float, acc_real)),
        "acc_fake": list(map(float, acc_fake)),
    }


def _batches(loader):
    """Endless (images, labels) batches, epoch after epoch, from the loader's position."""
    while True:
        yield from loader


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
    config: dict  # the params the run was made with (config.to_dict)
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
        """Restore a checkpoint of this stage (RNG states are per rank: see _resume)."""
        self.g.load_state_dict(state["G"])
        self.g_ema.load_state_dict(state["G_ema"])
        self.d.load_trainable_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_G"])
        self.opt_d.load_state_dict(state["opt_D"])
        self.stage, self.cur_nimg = state["stage"], state["cur_nimg"]
        self.history, self.mlflow_run_id = list(state["history"]), state["mlflow_run_id"]
        self.data_position = tuple(state.get("data_position") or (0, 0))


def _stage_models(cfg, stage: Stage, num_classes: int, device, g_ema_prev):
    """G, G_ema, D and their optimisers for a stage; later stages start from g_ema_prev."""
    table = None
    if cfg.train.embed_init:
        # The class-embedding init of G (docs/model.md 2) and of every D head (section 3).
        table = embedding.load(cfg.train.embed_init, num_classes, cfg.generator.embed_dim)
    with torch.random.fork_rng(devices=[]):
        # Initial weights (and the frozen random parts of D, which checkpoints do not
        # carry) are a function of the seed alone: every rank and every rerun builds the same.
        torch.manual_seed(cfg.train.seed)
        if g_ema_prev is None:
            g = Generator(cfg.generator, stage.resolution).to(device)
            if table is not None:
                with torch.no_grad():
                    g.mapping.embed.weight.copy_(table)
        else:
            g = copy.deepcopy(g_ema_prev).train().requires_grad_(True)
            g.synthesis.set_resolution(stage.resolution)
        g.synthesis.checkpoint_levels = cfg.train.checkpoint_levels
        g_ema = copy.deepcopy(g).eval().requires_grad_(False)
        d = ProjectedDiscriminator(cfg.discriminator, stage.resolution, num_classes).to(device)
        if table is not None:
            d.init_class_embeddings(table.to(device))
    t = cfg.train
    opt_g = torch.optim.Adam(g.parameters(), lr=t.lr_g, betas=tuple(t.betas), eps=t.eps)
    d_params = [p for p in d.parameters() if p.requires_grad]
    opt_d = torch.optim.Adam(d_params, lr=t.lr_d, betas=tuple(t.betas), eps=t.eps)
    return g, g_ema, d, opt_g, opt_d


def _say(run: RunDir, event: str, message: str | None = None, **fields) -> dict:
    """Rank 0's account of what happened: a line of events.jsonl, what MLflow keeps of it, and
    a line for people on stderr."""
    record = run.emit(event, **fields)
    tracking.log_event(record)
    if message:
        tqdm.write(message, file=sys.stderr)
    return record


def _handoff(store, g_ema, index: int, stages) -> tuple[Generator, str]:
    """The generator stage `index` starts from, and how it was chosen: the best-FID snapshot of
    the stage before when FID during training ran there (as the reference), else its last EMA."""
    prev = stages[index - 1]
    best = store.best(index - 1)
    state = store.load(best["name"]) if best else None
    if state is None:
        how = f"the last EMA of stage {index - 1} ({prev.resolution}px)"
        if best:
            how += f" (its best snapshot {best['name']} did not load)"
        return g_ema, how
    g_ema = copy.deepcopy(g_ema)
    g_ema.load_state_dict(state["G_ema"])
    how = (
        f"the best-FID snapshot of stage {index - 1} ({prev.resolution}px): kimg "
        f"{best['kimg']:g}, FID {best['fid']:.3f}"
    )
    return g_ema, how


def _resume(store, cfg, rank: int, restart: bool):
    """The latest good checkpoint's state and URI ((None, None) for a fresh run), after checking
    it fits cfg; sets this rank's RNG states from it.

    When the run has checkpoints but none loads, training starts from image 0 only with
    `restart`: a silent restart would train over the old run's names.
    """
    try:
        resumed = store.load_latest(move_aside=rank == 0)
    except NoGoodCheckpoint as e:
        if not restart:
            raise StorageError(
                f"{e}\nnothing trained: make the storage readable and rerun, or start from "
                "image 0 with `polyinr train --restart` (or another tracking.run_name)"
            ) from None
        if rank == 0:
            print(f"{e}\nstarting from image 0 (--restart)", file=sys.stderr)
        return None, None
    if resumed is None:
        return None, None
    state, uri = resumed
    changed = config.identity_diff(config.identity(state["config"]), config.identity(cfg))
    if changed:
        raise ValueError(
            f"checkpoint {uri} was made with other params ({'; '.join(changed)}); put "
            "{params} in tracking.run_name or use another name to start a new run"
        )
    states = state["rng"]  # one entry per rank of the run that saved it
    if isinstance(states, list) and rank < len(states):
        distributed.set_rng_states(states[rank])
    return state, uri


def _schedule(t, batch: int) -> tuple[list[int], list[int]]:
    """Each stage's first and end cur_nimg. Stages run whole iterations: each one's kimg rounded
    up to a multiple of the batch, so the next starts where this one stopped (its blur and EMA
    ramps from its image 0)."""
    ends = np.cumsum([-(-int(s.kimg * 1000) // batch) * batch for s in t.stages]).tolist()
    return [0, *ends[:-1]], ends


def train(
    cfg,
    device: torch.device,
    run_dir: str | Path,
    progress: bool = True,
    until_stage: int | None = None,
    restart: bool = False,
    wait: bool = False,
) -> dict:
    """Run (or resume) the schedule of cfg.train.stages; returns a summary.

    run_dir: the local run folder (polyinr/training/rundir.py): the exported generator, the
    curves and
    the event log; checkpoints go to `<storage.uri>/<tracking.run_name>`.
    until_stage: stop once progressive stage `until_stage` (an index into train.stages) is
    complete and checkpointed, instead of running the whole schedule; the final generator is
    exported only when the last stage completes. The Prefect flow runs one stage per task so.
    restart: start from image 0 when the run has checkpoints but none of them loads.
    wait: when another trainer holds the run's lease, wait for it instead of raising LeaseHeld.
    Under torchrun every rank calls this; rank 0 writes checkpoints, the run folder and MLflow.
    Raises Preempted after checkpointing when the process receives SIGTERM.
    """
    stages = cfg.train.stages
    last = len(stages) - 1 if until_stage is None else until_stage
    if not 0 <= last < len(stages):
        raise ValueError(
            f"--until-stage {until_stage}: train.stages has stages 0 to {len(stages) - 1} "
            f"({', '.join(f'{s.resolution}px' for s in stages)})"
        )
    # The prepared data must fit the config: one line now, not an IndexError minutes later.
    classes = cfg.generator.num_classes if cfg.generator.conditional else None
    for stage in stages[: last + 1]:
        data.check_prepared(cfg.data.out_dir, stage.resolution, classes)
    # issue 29 hook: one trainer per run, its lease held (and renewed) around the whole run.
    with distributed.StopFlag() as stop, lease.held(cfg, wait):
        try:
            return _train(cfg, device, RunDir(Path(run_dir)), progress, stop, last, restart)
        except BaseException as e:
            # Close the MLflow run (a rerun continues it by id) so this process can start others.
            interrupted = isinstance(e, Preempted | KeyboardInterrupt)
            tracking.end_run("KILLED" if interrupted else "FAILED")
            raise


def _train(
    cfg, device, run: RunDir, progress: bool, stop: distributed.StopFlag, last: int, restart: bool
) -> dict:
    configure_backends()
    rank, world = distributed.rank_world()
    t = cfg.train
    batch_gpu = t.batch_gpu or t.batch // world
    rounds = t.batch // (batch_gpu * world)
    if rounds < 1 or rounds * batch_gpu * world != t.batch:
        raise ValueError(
            f"train.batch={t.batch} is not a multiple of batch_gpu ({batch_gpu}) "
            f"x world size ({world})"
        )
    _check_embed_init(cfg)

    # Storage problems (credentials, bucket, permissions) stop here, before any compute.
    store = CheckpointStore(cfg.storage, cfg.tracking.run_name)
    distributed.on_rank0(store.check, rank, world)
    resumed, resumed_uri = _resume(store, cfg, rank, restart)
    if stop.any_rank(world, device):  # SIGTERM during start-up: nothing new to save yet
        raise Preempted("stopped by SIGTERM during start-up; rerun the same command to resume")
    cur_nimg = resumed["cur_nimg"] if resumed else 0
    starts, ends = _schedule(t, t.batch)
    final = last == len(t.stages) - 1  # the whole schedule: export the generator at the end
    if final and resumed and (cur_nimg > ends[-1] or resumed["stage"] >= len(t.stages)):
        # A shorter schedule than this run's checkpoints: refused before MLflow is touched.
        raise ValueError(
            f"the checkpoints in {store.uri} are at kimg {cur_nimg / 1000:g}, past the end of "
            f"train.stages (kimg {ends[-1] / 1000:g}): lengthen the schedule to continue, or "
            f"use the run's {run.generator} as it is"
        )
    if not final and cur_nimg >= ends[last]:
        if rank == 0:
            resolution = t.stages[last].resolution
            run.emit(
                "already_complete",
                stage=last,
                resolution=resolution,
                nimg=cur_nimg,
                checkpoint=resumed_uri,
            )
            print(
                f"stage {last} ({resolution}px) is already complete: the checkpoint is at kimg "
                f"{cur_nimg / 1000:g}, the stage ends at kimg {ends[last] / 1000:g}",
                file=sys.stderr,
            )
        return {"cur_nimg": cur_nimg, "stage": last, "already_complete": True}

    run_id = resumed["mlflow_run_id"] if resumed else None
    if rank == 0:
        if run_id is None:
            mlflow_run = tracking.start_run(cfg.tracking, params=config.flatten(cfg))
        else:  # a new run, tagged with this id, when the store never saw it (another host)
            mlflow_run = tracking.continue_run(cfg.tracking, run_id, params=config.flatten(cfg))
        run_id = mlflow_run.info.run_id
        tracking.set_tags(  # the params keep the first schedule; a resume may lengthen it
            {
                "discriminator.pretrained": str(cfg.discriminator.pretrained),
                "discriminator.weights": weights_label(cfg.discriminator),
                "train.stages": str(config.flatten(cfg)["train.stages"]),
            }
        )
        _say(
            run,
            "run_started",
            f"resuming from {resumed_uri} at kimg {cur_nimg / 1000:g}" if resumed else None,
            run_name=cfg.tracking.run_name,
            checkpoints=store.uri,
            mlflow_run_id=run_id,
            resumed_from=resumed_uri,
            nimg=cur_nimg,
        )

    fid = metrics.TrainingFID(cfg, device) if cfg.eval.every_kimg > 0 else None
    num_classes = cfg.generator.num_classes if cfg.generator.conditional else 0
    grid_classes = torch.arange(min(max(num_classes, 1), 8)).repeat_interleave(8)
    state = None  # the State of the stage being trained
    for index, stage in enumerate(t.stages[: last + 1]):
        resuming = resumed is not None and resumed["stage"] == index
        if cur_nimg >= ends[index] and not resuming:
            continue
        g_ema_prev, how = None, "random initialisation"
        if resuming:
            how = f"checkpoint {resumed_uri}"
        elif state is not None:
            g_ema_prev, how = _handoff(store, state.g_ema, index, t.stages)
        state = State(
            *_stage_models(cfg, stage, num_classes, device, g_ema_prev),
            stage=index,
            cur_nimg=cur_nimg,
            history=list(state.history) if state else [],
            mlflow_run_id=run_id,
            config=config.to_dict(cfg),
        )
        if resuming:
            state.load_state_dict(resumed)
            state.mlflow_run_id, resumed = run_id, None
            # issue 29: a kill between a commit and its mark_best left the FID in the
            # history but unmarked; marking again from the history is idempotent.
            if rank == 0 and fid is not None:
                _mark_bests(store, state.history, fid.name, index)
        for module in (state.g, state.g_ema, state.d):
            distributed.broadcast(module, world)
        if cur_nimg >= ends[index]:
            continue  # resumed at the very end of this stage: hand over to the next one
        if rank == 0:
            _say(
                run,
                "stage_started",
                f"stage {index} ({stage.resolution}px) starts from {how}" if index else None,
                stage=index,
                resolution=stage.resolution,
                nimg=cur_nimg,
                start=how,
            )
        cur_nimg = _train_stage(
            cfg, state, store, run, fid, index, starts[index], ends[index], grid_classes,
            device, progress, stop, batch_gpu, rounds,
        )  # fmt: skip
        if rank == 0:
            _say(run, "stage_done", stage=index, resolution=stage.resolution, nimg=cur_nimg)

    if not final:
        if rank == 0:
            tracking.end_run()  # the next stage's command continues this MLflow run by id
            print(
                f"stage {last} ({t.stages[last].resolution}px) complete at kimg "
                f"{cur_nimg / 1000:g}; `polyinr train` continues with stage {last + 1}",
                file=sys.stderr,
            )
        return {"cur_nimg": cur_nimg, "stage": last, "mlflow_run_id": run_id}
    g_ema = state.g_ema
    if rank == 0:
        meta = {
            "mlflow_run_id": run_id,
            "cur_nimg": cur_nimg,
            "resolution": t.stages[-1].resolution,
            "discriminator_pretrained": cfg.discriminator.pretrained,
            "discriminator_weights": weights_label(cfg.discriminator),
        }
        save_generator(g_ema, run.generator, meta)
        _write_curves(state.history, run)
        _say(
            run,
            "exported",
            f"generator: {run.generator}",
            path=str(run.generator),
            nimg=cur_nimg,
            weights_sha256=tensors_sha256(g_ema.state_dict()),
            mlflow_run_id=run_id,
        )
        for path in (run.train_curve, run.events):
            tracking.log_artifact(path)
        tracking.end_run()
    return {
        "cur_nimg": cur_nimg,
        "mlflow_run_id": run_id,
        "generator": str(run.generator),
        "weights_sha256": tensors_sha256(g_ema.state_dict()),
    }


def _check_embed_init(cfg) -> None:
    """train.embed_init fits the models: G and every D head start from one class table."""
    if not cfg.train.embed_init:
        return
    if not cfg.generator.conditional:
        raise ValueError("train.embed_init needs generator.conditional=true")
    if cfg.discriminator.embed_dim != cfg.generator.embed_dim:
        raise ValueError(
            f"train.embed_init initialises G's and D's class embeddings from one table: "
            f"generator.embed_dim ({cfg.generator.embed_dim}) and discriminator.embed_dim "
            f"({cfg.discriminator.embed_dim}) must be equal"
        )
    embedding.load(cfg.train.embed_init, cfg.generator.num_classes, cfg.generator.embed_dim)


def _train_stage(
    cfg, state: State, store, run: RunDir, fid, index: int, start: int, end: int, grid_classes,
    device, progress: bool, stop, batch_gpu: int, rounds: int,
) -> int:  # fmt: skip
    """Train progressive stage `index` from state.cur_nimg to `end`; returns cur_nimg."""
    rank, world = distributed.rank_world()
    t, stage = cfg.train, cfg.train.stages[index]
    loader = data.make_loader(
        data.beton_path(cfg.data.out_dir, stage.resolution),
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
    batches = _batches(loader)
    ema_nimg_full = (t.ema_kimg if t.ema_kimg >= 0 else t.batch * 10 / 32) * 1000
    bar = tqdm(
        total=end - start,
        initial=state.cur_nimg - start,
        unit="img",
        unit_scale=True,  # 1.02k/6.02k img, no float noise
        desc=f"stage {index} ({stage.resolution}px)",
        disable=not progress or rank > 0,
    )
    heads = len(state.d.branches) * 4
    sums, count = np.zeros(2 + 2 * heads), 0
    next_snapshot = _next_tick(state.cur_nimg, t.snapshot_kimg)
    next_sample = _next_tick(state.cur_nimg, t.sample_kimg)
    positions = [distributed.positions(q, rank, world, batch_gpu) for q in range(rounds)]
    g, g_ema = state.g, state.g_ema
    fid_name = fid.name if fid else None  # the curve's FID column, named by its sample count
    while state.cur_nimg < end:
        cur_nimg = state.cur_nimg
        distributed.reseed(t.seed, rank, cur_nimg)
        z_g, z_d = distributed.draws(t.seed, cur_nimg, t.batch, cfg.generator.z_dim)
        sigma = augment.blur_sigma(
            cur_nimg - start, cfg.discriminator.blur_sigma, cfg.discriminator.blur_kimg
        )
        reals = [next(batches) for _ in range(rounds)]
        stats = training_step(
            g,
            state.d,
            state.opt_g,
            state.opt_d,
            reals,
            [z_g[pos].to(device) for pos in positions],
            [z_d[pos].to(device) for pos in positions],
            sigma,
            world,
            t.precision,
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

        sums += [stats["loss_g"], stats["loss_d"], *stats["acc_real"], *stats["acc_fake"]]
        count += 1
        bar.update(t.batch)
        # No forced redraw: every mininterval ($TQDM_MININTERVAL), not every step.
        bar.set_postfix(
            loss_g=f"{stats['loss_g']:.3f}",
            loss_d=f"{stats['loss_d']:.3f}",
            d_acc=f"{np.mean(stats['acc_real'] + stats['acc_fake']):.2f}",
            refresh=False,
        )
        done = cur_nimg >= end
        if rank == 0 and (cur_nimg >= next_sample or done):
            next_sample = _next_tick(cur_nimg, t.sample_kimg)
            rows = len(grid_classes) // 8
            grid = render_grid(g_ema, grid_classes, list(range(8)) * rows, t.sample_psi, rows)
            tracking.log_image(grid, key="samples", step=cur_nimg)  # steps are images
        stopping = stop.any_rank(world, device)
        if not (cur_nimg >= next_snapshot or done or stopping):
            continue
        # A snapshot: the curve's row (and the FID when due), then the checkpoint.
        next_snapshot = _next_tick(cur_nimg, t.snapshot_kimg)
        mean = distributed.mean_over_ranks(sums / max(count, 1), world, device)
        sums, count = np.zeros_like(sums), 0
        row = _curve_row(cur_nimg, index, stage.resolution, mean, heads, sigma)
        every = int(cfg.eval.every_kimg * 1000)
        if fid and not stopping and (done or _fid_due(state.history, fid_name, cur_nimg, every)):
            row[fid_name] = fid(g_ema, stage.resolution)  # all ranks
        state.history.append(row)
        state.data_position = loader.position
        checkpoint = state.state_dict(rng=distributed.all_rng_states(world))
        info = {
            "stage": index,
            "resolution": stage.resolution,
            "kimg": cur_nimg / 1000,
            "weights_sha256": tensors_sha256(g_ema.state_dict()),
        }
        save = functools.partial(store.save, checkpoint, cur_nimg, info)
        uri = distributed.on_rank0(save, rank, world)
        if rank == 0:
            _say(
                run,
                "checkpoint",
                f"kimg {cur_nimg / 1000:g}: loss_g {row['loss_g']:.3f} loss_d "
                f"{row['loss_d']:.3f} D acc real {row['acc_real']:.2f} fake "
                f"{row['acc_fake']:.2f} -> {uri}",
                stage=index,
                resolution=stage.resolution,
                nimg=cur_nimg,
                uri=uri,
                metrics={k: row[k] for k in row if k not in CURVE_KEYS and k != fid_name},
            )
            if fid_name in row:
                best = store.mark_best(snapshot_name(cur_nimg), row[fid_name], index)
                _say(
                    run,
                    "fid",
                    f"kimg {cur_nimg / 1000:g}: {fid_name} {row[fid_name]:.3f}"
                    + (" (best of the stage)" if best else ""),
                    stage=index,
                    resolution=stage.resolution,
                    nimg=cur_nimg,
                    metric=fid_name,
                    value=row[fid_name],
                    best=best,
                )
            _write_curves(state.history, run)
        if stopping:
            bar.close()
            if rank == 0:
                run.emit("preempted", stage=index, nimg=cur_nimg, uri=uri)
            raise Preempted(
                f"stopped by SIGTERM at kimg {cur_nimg / 1000:g}; checkpoint {uri}; "
                "rerun the same command to resume"
            )
    bar.close()
    return state.cur_nimg


def _mark_bests(store, history: list[dict], name: str, stage: int) -> None:
    """Mark stage `stage`'s best snapshot from the FIDs (column `name`) in the history.

    The FID of a snapshot is in its checkpoint's history before `mark_best` runs, so a run
    killed in between resumes with an FID that was never marked; `mark_best` keeps the lowest
    per stage, so calling it again for every FID of the stage changes nothing otherwise.
    Snapshots pruned since (never the best) are skipped.
    """
    present = set(store.folder.sizes())
    for row in history:
        snapshot = snapshot_name(round(row["kimg"] * 1000))
        if row.get("stage") == stage and name in row and snapshot in present:
            store.mark_best(snapshot, row[name], stage)


def _fid_due(history: list[dict], name: str, cur_nimg: int, every: int) -> bool:
    """Whether an `every`-image boundary was crossed since the curve's last FID (column `name`)."""
    last = max((round(r["kimg"] * 1000) for r in history if name in r), default=0)
    return cur_nimg // every > last // every


def _next_tick(cur_nimg: int, every_kimg: float) -> int:
    every = max(int(every_kimg * 1000), 1)
    return (cur_nimg // every + 1) * every


CURVE_KEYS = ("kimg", "stage", "resolution")  # a curve row's position, the rest are numbers


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


def _write_curves(history: list[dict], run: RunDir) -> None:
    """train.csv (every row, without FIDs) and fid.csv (the rows with one), which `dvc plots`
    and the MLflow run show."""
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
