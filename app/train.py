"""`train(config)`: one tracked run, used by `python -m app train` and by every sweep trial.

Phases: W&B run + effective config -> device and data -> model, optimizer, resume -> epochs
(train, validate, checkpoint) -> test -> ONNX export saved to the run. A loss that turns NaN or inf
ends the run where it is seen, as a result (app.divergence).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from app import artifact, divergence, interrupts, phases, preflight, ranks, settings, tracking
from app import checkpoint as checkpoints
from app.checkpoint import save as save_checkpoint
from app.config import Config
from app.devices import Setup, pick_device, release_device_memory, setup  # noqa: F401 (imported from here too)
from app.errors import UserError
from app.export import export_onnx
from app.gpu_share import run_share
from app.progress import LossReadout, Progress
from app.step import build_model, compile_model, ddp_step, evaluate, make_steps, set_optimizer_flags


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after writing a checkpoint; exit non-zero so W&B requeues.

    `told`: W&B recorded the run as preempting (and its exit). False when a job-wide stop ended W&B's
    service first: W&B then never hands the run out again, so a sweep must resume it by itself."""

    def __init__(self, signum: int, told: bool = True):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.told = told


EpochHook = Callable[[int, dict[str, float]], bool]


def train(config: Config, environ: Mapping[str, str] | None = None, on_epoch: EpochHook | None = None,
          ready: preflight.Ready | None = None, run_settings: Mapping[str, Any] | None = None,
          sweep_results: artifact.SweepResults | None = None) -> dict[str, Any]:
    """One tracked run. `on_epoch(epoch, metrics)` is told each epoch's val metrics; True stops the run
    early (an offline sweep's pruner uses it), skipping test and export; so does a loss, val_loss, test_loss
    or weight that turns non-finite (result "diverged": True and where, app.divergence). `ready`: the environment
    checks a caller already made (`preflight.check_environment`); the data checks are made here.
    `run_settings`: the run's name, group, tags... (tracking.start), for a process that runs many.
    `sweep_results`: an offline sweep trial's view of its sweep, for the model's best alias (app.artifact)."""
    environ = os.environ if environ is None else environ
    phases.mark("start")  # process start and imports (a trial in a warm process: the agent's own work)

    # --- every check first (no W&B run is left for a setting that can't work), then one wandb.init ---
    ready = ready or preflight.check_environment(config, environ)
    preflight.check_data(config)
    n_ranks = ranks.size(environ)
    ranks.check(config, n_ranks, pick_device(config).type if n_ranks > 1 else "cpu", environ)
    run_id = settings.get("WANDB_RUN_ID", environ)
    if run_id and not settings.is_set("WANDB_SWEEP_ID", environ):
        # a resume that can't continue the run is refused before W&B opens it (in a W&B sweep the sweep's
        # values are known only after wandb.init: the same check then runs at the resume below)
        checkpoints.check_resume(config, ready.output_root / run_id, run_id)
    checked = config
    phases.mark("checks")
    run, config = tracking.start(config, environ, mode=ready.mode, **(run_settings or {}))  # a sweep's values: the last layer
    phases.mark("wandb_init")
    exit_code = 1  # anything that escapes below is a failed run, not a finished one
    stopped: Preempted | interrupts.Stopped | None = None
    team = ranks.Team()
    try:
        if config != checked:
            preflight.check_data(config)
            ranks.check(config, n_ranks, pick_device(config).type if n_ranks > 1 else "cpu", environ)
        if n_ranks > 1:  # the other ranks get the values resolved here: never W&B's
            team = ranks.start(n_ranks, environ, pick_device(config).type,
                               {"config": config, "run_id": run.id, "output_root": str(ready.output_root)}, _follow)
        result = _train(run, config, ready.output_root, environ, on_epoch, sweep_results, team)
        exit_code = 0
        return result
    except divergence.Diverged as diverged:
        exit_code = 0  # a finished run whose values diverge, not a failed one: an agent goes on to the next
        run.summary.update(diverged.summary())
        return {"run_id": run.id, "pruned": False, **diverged.summary(),
                "upload": tracking.offline_hint(run) if tracking.is_offline(run) else None}
    except (Preempted, interrupts.Stopped) as stop:
        if isinstance(stop, interrupts.Stopped):
            with interrupts.unless_wandb_lost() as marking:
                run.mark_preempting()  # stopped before training: a sweep hands these values out again
            stop.told = not marking.lost
        stopped = stop
        exit_code = 128 + stop.signum
        raise
    except UserError:
        exit_code = 2
        raise
    except Exception as exc:
        lost = team.lost(exc)
        if lost is not None:
            raise lost from exc  # one line naming the rank, not gloo's or NCCL's
        if not interrupts.wandb_lost(exc):
            raise
        # W&B's service died under the run (a job-wide stop reaches it too): a stop, resumed from the
        # last checkpoint, not a failed run
        signum = interrupts.requested() or signal.SIGTERM
        exit_code = 128 + signum
        stopped = Preempted(signum, told=False)  # nothing could mark it preempting
        raise stopped from exc
    finally:
        team.end(ok=exit_code == 0 or stopped is not None)  # a failed trial ends the other ranks at once
        failing = sys.exc_info()[1] is not None  # its line is the one said; W&B's files on a full volume add none
        with interrupts.deferred(), interrupts.unless_wandb_lost() as finishing, tracking.own_files(run, failing):
            run.finish(exit_code=exit_code)  # a stop must not cut the exit record short
        if stopped is not None and finishing.lost:
            stopped.told = False  # the preempting mark went nowhere: the service was gone before it recorded it
        if not run.disabled:
            tracking.materialize_links(Path(run.dir).parent)  # the runs folder must survive a move
        phases.mark("finish")


def _train(run, config: Config, output_root: Path, environ: Mapping[str, str], on_epoch: EpochHook | None,
           sweep_results: artifact.SweepResults | None, team: ranks.Team) -> dict[str, Any]:
    # --- device and data ---
    if not config.gpu_memory_fraction:
        # agents sharing this GPU through slots: an equal share among those on it as this run starts
        config = config.replace(gpu_memory_fraction=round(run_share(environ) or 0.0, 4))
    device, ds, gen, fmt, train_batches, val_batches, test_batches = setup(config, team)
    # which GPU slot an agent was given: recorded so a sweep's runs can be traced to their device. From the
    # process's own environment, where CUDA reads it (an in-process agent's `environ` is only a copy)
    run.summary.update({"device": str(device), "cuda_visible_devices": settings.get("CUDA_VISIBLE_DEVICES") or ""})
    phases.mark("data")

    # --- model, optimizer, resume ---
    model, optimizer = build_model(config, device)
    criterion = nn.CrossEntropyLoss()
    run_dir = output_root / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    start_epoch, example_ct, resume_at = 0, 0, 0
    val_loss = val_acc = float("nan")  # the last finished epoch's (checkpointed with it)
    last: dict[str, float] = {}  # the checkpoint's (one from before they were kept has none)
    ckpt = checkpoints.check_resume(config, run_dir, run.id, device)  # refuses a finished run or other settings
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_optimizer_flags(optimizer, config, device)
        gen.set_state(ckpt["generator"].to(gen.get_state().device))
        start_epoch, example_ct = ckpt["epoch"], ckpt["examples_seen"]
        resume_at = ckpt.get("epoch_examples", 0)  # a stop mid-epoch: the epoch goes on from there
        last = checkpoints.last_val(ckpt)
        val_loss, val_acc = last.get("val_loss", val_loss), last.get("val_accuracy", val_acc)
        if team.lead:
            print(f"resuming run {run.id} from {ckpt_path}: {start_epoch} epoch(s) done, {example_ct} examples seen"
                  + (f" ({resume_at} of epoch {start_epoch + 1})" if resume_at else ""), flush=True)

    def checkpoint(epochs_done: int, generator: torch.Tensor | None = None, epoch_examples: int = 0) -> None:
        bad = checkpoints.nonfinite(model.state_dict())  # no resume could use diverged weights: none is written
        if bad:  # in the epoch stopped mid-way, or in the one just done
            raise divergence.Diverged(f"weight {bad} not finite", epochs_done if epoch_examples else epochs_done - 1,
                                      example_ct)
        if not team.lead:
            return  # rank 0 writes the one checkpoint: the unwrapped model's, the same for any number of ranks
        save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epochs_done,
                        examples_seen=example_ct, epoch_examples=epoch_examples,
                        generator=gen.get_state() if generator is None else generator,
                        config=config.to_dict(), run_id=run.id, val_loss=float(val_loss), val_accuracy=float(val_acc))

    step_model = compile_model(model, config.compile) if config.compile != "none" and team.size == 1 else model
    use_bf16 = config.amp == "bf16" and device.type == "cuda"
    if config.amp == "bf16" and not use_bf16:
        print("amp=bf16 applies on CUDA only; training in float32 on the CPU", flush=True)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    if team.size > 1:
        step, quiet = ddp_step(model, optimizer, config, device, team, autocast), ranks.devnull()
        eager_step = step
    else:
        eager_step, step = make_steps(step_model, optimizer, criterion, config, device, ds.train, fmt, autocast)
        quiet = None
    graphed = step is not eager_step
    # a replayed graph fires no Python hooks, so with graphs run.watch counts only the eager steps that
    # are taken every watch_log_freq batches for it: W&B logs on each (log_freq=1), the same cadence
    if team.lead:
        tracking.watch(run, model, criterion, config, log_freq=1 if graphed else config.watch_log_freq)
    watch_every = config.watch_log_freq if graphed and config.watch_log != "none" else 0
    batches_run = 0
    phases.mark("model")

    # --- epochs: train, validate, checkpoint ---
    train_time = 0.0
    examples_this_run = 0
    # losses cross to the host without a sync (one interval late at most on CUDA, at once on the CPU)
    readout = LossReadout(device)

    def log_losses(readings) -> None:
        for loss_total, (epoch_, step_, seen_, batches_, progress_) in readings:
            run.log({"epoch": epoch_, "loss": loss_total / batches_}, step=step_)
            progress_.update(seen_, loss_total / batches_)
            divergence.check("loss", loss_total / batches_, epoch_, step_)  # logged first: the history shows it

    with interrupts.StopRequest() as stop:
        for epoch in range(start_epoch, config.epochs):
            progress = Progress(epoch + 1, config.epochs, len(ds.train), stream=quiet)
            loss_sum = torch.zeros((), device=device)  # summed on the device; read at log points only
            batches_in_sum = 0
            # a run resumed mid-epoch draws the epoch's order again and starts where it stopped
            epoch_start_gen, first = gen.get_state(), resume_at
            seen, resume_at = first, 0
            t0 = time.perf_counter()
            shares = train_batches.shards_from(first, team.rank, team.size)
            for batch_idx, (x, y, total) in enumerate(shares, start=first // config.batch_size):
                batches_run += 1
                loss_sum += (step(x, y, total) if team.size > 1
                             else (eager_step if watch_every and batches_run % watch_every == 0 else step)(x, y))
                batches_in_sum += 1
                seen += total
                example_ct += total
                if (batch_idx + 1) % config.log_interval == 0:
                    readout.push(team.sum(loss_sum), (epoch, example_ct, seen, batches_in_sum, progress))
                    loss_sum.zero_()
                    batches_in_sum = 0
                    log_losses(readout.ready())
                if team.size > 1:  # every rank stops after the same step (app.ranks: the stop agreement)
                    stop.signum = team.agree_stop(stop.signum or (None if team.lead else interrupts.requested()), device)
                if stop.signum is not None:
                    # the weights so far and where this epoch's order stands: the resumed run goes on from
                    # here, so the step axis counts every example trained exactly once. Written before any
                    # W&B call: a job-wide stop may have ended W&B's service as well
                    checkpoint(epoch, generator=epoch_start_gen, epoch_examples=seen)
                    with interrupts.unless_wandb_lost():
                        log_losses(readout.drain())
                    progress.close(f"stopped at {seen}/{len(ds.train)} examples; checkpoint {ckpt_path}", seen)
                    with interrupts.unless_wandb_lost() as marking:
                        run.mark_preempting()
                    raise Preempted(stop.signum, told=not marking.lost)
            log_losses(readout.drain())
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            examples_this_run += seen - first
            val_loss, val_acc = evaluate(step_model, val_batches, criterion, autocast, team, len(ds.val)) if len(ds.val) else (val_loss, val_acc)
            run.log({"epoch": epoch, "val_loss": val_loss, "val_accuracy": val_acc,
                     "examples_per_s": (seen - first) / epoch_time}, step=example_ct)
            if len(ds.val):  # without a val split val_loss stays NaN: the weights' check below still holds
                divergence.check("val_loss", val_loss, epoch, example_ct)
            checkpoint(epoch + 1)
            progress.close(f"done: val_loss {val_loss:.4f} val_accuracy {val_acc:.4f}", seen)
            # epoch_seconds/examples: the training loop's own time and work (bench/ times runs with them)
            early = on_epoch is not None and on_epoch(epoch, {"val_loss": val_loss, "val_accuracy": val_acc,
                                                             "examples_per_s": (seen - first) / epoch_time,
                                                             "epoch_seconds": epoch_time, "examples": seen - first})
            if team.decide(bool(early)):  # rank 0's hook decides for every rank
                run.summary["pruned"] = True
                if team.lead:
                    print(f"stopped early after epoch {epoch + 1}", flush=True)
                return {"run_id": run.id, "pruned": True, "val_accuracy": val_acc, "val_loss": val_loss,
                        "examples_seen": example_ct, "checkpoint": str(ckpt_path)}

        if start_epoch >= config.epochs:
            # resumed after its last epoch (stopped in test or export): nothing was trained or validated in
            # this run, so its history logs no epoch twice; its summary and result still say what the
            # last epoch measured (a sweep trial reports it)
            run.summary.update(last)

        # --- test and export ---
        phases.mark("training")
        test_loss, test_acc = evaluate(step_model, test_batches, criterion, autocast, team, len(ds.test))
        run.log({"test_accuracy": test_acc, "test_loss": test_loss}, step=example_ct)
        run.summary["test_accuracy"] = test_acc
        if not team.lead:  # the test metrics are every rank's (reduced); rank 0 alone says, exports and records
            divergence.check("test_loss", test_loss, config.epochs - 1, example_ct)
            return {"run_id": run.id, "pruned": False, "test_accuracy": test_acc, "test_loss": test_loss}
        print(f"test_accuracy {test_acc:.4f} test_loss {test_loss:.4f}", flush=True)
        divergence.check("test_loss", test_loss, config.epochs - 1, example_ct)  # no export of such a model
        phases.mark("evaluation")
        onnx_path = run_dir / "model.onnx"
        check = export_onnx(model, ds.mean, ds.std, ds.test.images[:256], onnx_path) if stop.signum is None else {}
        if stop.signum is not None:
            # stopped during test or export: not finished (model.onnx marks that); the last epoch's
            # checkpoint stands, and the requeued run goes straight to test and export
            onnx_path.unlink(missing_ok=True)
            run.mark_preempting()
            raise Preempted(stop.signum)
        run.summary.update(check)
        phases.mark("export")
        try:
            tracking.save_file(run, onnx_path)
            artifact.log_model(run, config, [onnx_path, ckpt_path],
                               {"test_accuracy": test_acc, "test_loss": test_loss, "val_accuracy": val_acc,
                                "val_loss": val_loss, **check}, environ, sweep_results)
        except UserError:  # the run folder's volume is full: not finished, so a rerun of this id exports it again
            onnx_path.unlink(missing_ok=True)
            raise
        phases.mark("artifact")
    return {
        "upload": tracking.offline_hint(run) if tracking.is_offline(run) else None,  # printed last (app.runner)
        "run_id": run.id,
        "pruned": False,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "val_accuracy": val_acc,
        "val_loss": val_loss,
        "examples_seen": example_ct,
        "examples_per_s": examples_this_run / train_time if train_time else float("nan"),
        "checkpoint": str(ckpt_path),
        "onnx": str(onnx_path),
        **check,
    }


def _follow(index: int, payload: dict[str, Any], store_port: int, n: int) -> None:
    """A rank that rank 0 started (torch.multiprocessing): joins, trains with rank 0's values, records nothing."""
    ranks.quiet_signals(interrupts.note)
    team = ranks.join_started(index, store_port, n, pick_device(payload["config"]).type, payload["rank_timeout_s"])
    code = follow(team, payload)
    if code:
        raise SystemExit(code)


def follow(team: ranks.Team, payload: dict[str, Any]) -> int:
    """A rank other than 0, in the trial rank 0 leads: the exit code it ends with."""
    ok, code = False, 1
    try:
        _train(ranks.QuietRun(payload["run_id"]), payload["config"], Path(payload["output_root"]), {}, None, None, team)
        ok, code = True, 0
    except Preempted as stop:
        ok, code = True, 128 + stop.signum
    except divergence.Diverged:
        ok, code = True, 0  # rank 0 records it
    except Exception as exc:
        lost = team.lost(exc)
        if lost is None:
            raise
        print(f"error: {lost}", flush=True)
    finally:
        team.end(ok)
    return code
