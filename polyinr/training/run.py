"""A training run: check storage, resume, track in MLflow, train stage by stage, export.

Progress is counted in images (cur_nimg). Rerun the same command to resume: every random draw
is a function of (seed, cur_nimg), so a resumed run continues exactly where the last one
stopped. A run is a State saved to `<storage.uri>/<run_name>` and a run folder
(polyinr/training/rundir.py); the loop itself is polyinr/training/loop.py.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from polyinr import data
from polyinr.core import distributed, params
from polyinr.core.config import Stage
from polyinr.core.errors import Preempted, StorageError
from polyinr.evaluation import metrics
from polyinr.model.discriminator import ProjectedDiscriminator, weights_label
from polyinr.model.generator import Generator, save_generator
from polyinr.training import embedding, lease, tracking
from polyinr.training.checkpoints import (
    CheckpointStore,
    NoGoodCheckpoint,
    snapshot_name,
    tensors_sha256,
)
from polyinr.training.loop import (
    State,
    configure_backends,
    say,
    schedule,
    split_batch,
    training_loop,
    write_curves,
)
from polyinr.training.rundir import RunDir


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
    curves and the event log; checkpoints go to `<storage.uri>/<tracking.run_name>`.
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
    for stage in stages[: last + 1]:
        data.check_prepared(cfg.data.out_dir, stage.resolution, cfg.generator.class_count or None)
    # One trainer per run: its lease is held (and renewed) around the whole run (lease.py).
    with distributed.StopFlag() as stop, lease.held(cfg, wait):
        try:
            return _run(cfg, device, RunDir(Path(run_dir)), progress, stop, last, restart)
        except BaseException as e:
            # Close the MLflow run (a rerun continues it by id) so this process can start others.
            interrupted = isinstance(e, Preempted | KeyboardInterrupt)
            tracking.end_run("KILLED" if interrupted else "FAILED")
            raise


def _run(cfg, device, run: RunDir, progress: bool, stop, last: int, restart: bool) -> dict:
    """The run's lifecycle around the loop: start (or report the stage done), train each stage
    from its predecessor's hand-off, then end the MLflow run or export the generator."""
    configure_backends()
    rank, world = distributed.rank_world()
    t = cfg.train
    split_batch(t, world)  # a batch that does not split: an error before any work
    _check_embed_init(cfg)
    # Storage problems (credentials, bucket, permissions) stop here, before any compute.
    store = CheckpointStore(cfg.storage, cfg.tracking.run_name)
    distributed.on_rank0(store.check, rank, world)
    resumed, resumed_uri = _resume(store, cfg, rank, restart)
    if stop.any_rank(world, device):  # SIGTERM during start-up: nothing new to save yet
        raise Preempted("stopped by SIGTERM during start-up; rerun the same command to resume")
    cur_nimg = resumed["cur_nimg"] if resumed else 0
    ends = schedule(t)[1]
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
        run_id = _track(cfg, run, store, run_id, resumed_uri, cur_nimg)
    fid = metrics.TrainingFID(cfg, device) if cfg.eval.every_kimg > 0 else None
    state = None  # the State of the stage being trained
    for index, stage in enumerate(t.stages[: last + 1]):
        resuming = resumed is not None and resumed["stage"] == index
        if cur_nimg >= ends[index] and not resuming:
            continue
        g_ema_prev, d_prev, how = None, None, "random initialisation"
        if resuming:
            how = f"checkpoint {resumed_uri}"
        elif state is not None:
            g_ema_prev, how = _handoff(store, state.g_ema, index, t.stages)
            if t.carry_d:
                d_prev, how = state.d, how + f", D from stage {index - 1}'s last"
        state = State(
            *_stage_models(cfg, stage, cfg.generator.class_count, device, g_ema_prev, d_prev),
            stage=index,
            cur_nimg=cur_nimg,
            history=list(state.history) if state else [],
            mlflow_run_id=run_id,
            config=params.to_dict(cfg),
        )
        if resuming:
            state.load_state_dict(resumed)
            state.mlflow_run_id, resumed = run_id, None
            # A kill between a commit and its mark_best left the FID in the history but
            # unmarked; marking again from the history is idempotent.
            if rank == 0 and fid is not None:
                _mark_bests(store, state.history, fid.name, index)
        for module in (state.g, state.g_ema, state.d):
            distributed.broadcast(module, world)
        if cur_nimg >= ends[index]:
            continue  # resumed at the very end of this stage: hand over to the next one
        where = {"stage": index, "resolution": stage.resolution}
        if rank == 0:
            message = f"stage {index} ({stage.resolution}px) starts from {how}" if index else None
            say(run, "stage_started", message, **where, nimg=cur_nimg, start=how)
        training_loop(cfg, state, store, run, fid, stop, progress)
        distributed.on_rank0(store.wait, rank, world)  # the stage's last upload lands first
        cur_nimg = state.cur_nimg
        if rank == 0:
            say(run, "stage_done", **where, nimg=cur_nimg)
    if final:
        return _export(cfg, state, run, rank)
    if rank == 0:
        tracking.end_run()  # the next stage's command continues this MLflow run by id
        print(
            f"stage {last} ({t.stages[last].resolution}px) complete at kimg "
            f"{cur_nimg / 1000:g}; `polyinr train` continues with stage {last + 1}",
            file=sys.stderr,
        )
    return {"cur_nimg": cur_nimg, "stage": last, "mlflow_run_id": run_id}


def _track(cfg, run: RunDir, store, run_id: str | None, resumed_uri, cur_nimg: int) -> str:
    """Rank 0: start the MLflow run, or continue the checkpoint's; its id."""
    flat = params.flatten(cfg)
    if run_id is None:
        mlflow_run = tracking.start_run(cfg.tracking, params=flat)
    else:  # a new run, tagged with this id, when the store never saw it (another host)
        mlflow_run = tracking.continue_run(cfg.tracking, run_id, params=flat)
    run_id = mlflow_run.info.run_id
    tracking.set_tags(  # the params keep the first schedule; a resume may lengthen it
        {
            "discriminator.pretrained": str(cfg.discriminator.pretrained),
            "discriminator.weights": weights_label(cfg.discriminator),
            "train.stages": str(flat["train.stages"]),
        }
    )
    for stage in cfg.train.stages:  # the FFCV files of the schedule, as the run's datasets
        if data.manifest_path(cfg.data.out_dir, stage.resolution).is_file():
            manifest = data.read_manifest(cfg.data.out_dir, stage.resolution)
            tracking.log_dataset(data.beton_path(cfg.data.out_dir, stage.resolution), manifest)
    say(
        run,
        "run_started",
        f"resuming from {resumed_uri} at kimg {cur_nimg / 1000:g}" if resumed_uri else None,
        run_name=cfg.tracking.run_name,
        checkpoints=store.uri,
        mlflow_run_id=run_id,
        resumed_from=resumed_uri,
        nimg=cur_nimg,
    )
    return run_id


def _export(cfg, state: State, run: RunDir, rank: int) -> dict:
    """The end of the schedule: rank 0 exports the EMA generator, the curves and the event log."""
    g_ema, cur_nimg, run_id = state.g_ema, state.cur_nimg, state.mlflow_run_id
    weights_sha256 = tensors_sha256(g_ema.state_dict())
    if rank == 0:
        meta = {
            "mlflow_run_id": run_id,
            "cur_nimg": cur_nimg,
            "resolution": cfg.train.stages[-1].resolution,
            "discriminator_pretrained": cfg.discriminator.pretrained,
            "discriminator_weights": weights_label(cfg.discriminator),
        }
        save_generator(g_ema, run.generator, meta)
        write_curves(state.history, run)
        say(
            run,
            "exported",
            f"generator: {run.generator}",
            path=str(run.generator),
            nimg=cur_nimg,
            weights_sha256=weights_sha256,
            mlflow_run_id=run_id,
        )
        for path in (run.train_curve, run.events):
            tracking.log_artifact(path)
        tracking.end_run()
    return {
        "cur_nimg": cur_nimg,
        "mlflow_run_id": run_id,
        "generator": str(run.generator),
        "weights_sha256": weights_sha256,
    }


def _stage_models(cfg, stage: Stage, num_classes: int, device, g_ema_prev, d_prev=None):
    """G, G_ema, D and their optimisers for a stage; later stages start from g_ema_prev, and
    with train.carry_d from d_prev's weights (its optimiser state starts afresh)."""
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
        # D's shapes follow its input size (discriminator.input_size): a stage that changes
        # it starts a fresh D.
        if d_prev is not None and not _carry_weights(d, d_prev):
            print(
                f"polyinr train: train.carry_d: D's shapes change at {stage.resolution}px "
                "(its input grows with the stage), so this stage starts a fresh D",
                file=sys.stderr,
            )
    t = cfg.train
    opt_g = torch.optim.Adam(g.parameters(), lr=t.lr_g, betas=tuple(t.betas), eps=t.eps)
    d_params = [p for p in d.parameters() if p.requires_grad]
    opt_d = torch.optim.Adam(d_params, lr=t.lr_d, betas=tuple(t.betas), eps=t.eps)
    return g, g_ema, d, opt_g, opt_d


def _carry_weights(d, d_prev) -> bool:
    """d_prev's weights into d when they have the same shapes; False (d stays fresh) else."""
    ours, theirs = d.state_dict(), d_prev.state_dict()
    if any(k not in theirs or theirs[k].shape != v.shape for k, v in ours.items()):
        return False
    d.load_state_dict(theirs)
    return True


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
    changed = params.identity_diff(params.identity(state["config"]), params.identity(cfg))
    if changed:
        raise ValueError(
            f"checkpoint {uri} was made with other params ({'; '.join(changed)}); put "
            "{params} in tracking.run_name or use another name to start a new run"
        )
    states = state["rng"]  # one entry per rank of the run that saved it
    if isinstance(states, list) and rank < len(states):
        distributed.set_rng_states(states[rank])
    return state, uri


def _check_embed_init(cfg) -> None:
    """train.embed_init fits the models: G and every D head start from one class table.

    Warns (one line each, training goes on) where the class path starts weak: no table (the
    classes start from random rows), or classes that the feature network sees as nearly
    parallel (G is likely to draw them alike).
    """
    if cfg.generator.conditional and not cfg.train.embed_init:
        print(
            "polyinr train: warning: train.embed_init is null, so G's and D's class "
            "embeddings start random; `polyinr class-embeddings` makes a table in which "
            "classes start apart (docs/model.md)",
            file=sys.stderr,
        )
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
    table = embedding.load(cfg.train.embed_init, cfg.generator.num_classes, cfg.generator.embed_dim)
    for a, b, cos in embedding.statistics(table)["parallel"]:
        print(
            f"polyinr train: warning: classes {a} and {b} start nearly parallel in "
            f"{cfg.train.embed_init} (cosine {cos:.3f}): they look alike to "
            f"{embedding.NETWORK}, so G may draw them alike",
            file=sys.stderr,
        )


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
