"""The training step: when the CUDA graph is used, that a replayed graph trains exactly like eager steps,
and that losses reach the log without a device sync yet with the values and steps a blocking read gives."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from conftest import clean_env, run_app
from torch import nn

from app import data, runlog
from app.config import Config
from app.progress import LossReadout
from app.step import (EagerStep, GraphedStep, build_model, compile_model, make_steps, optimizer_step,
                      set_optimizer_flags, uses_cuda_graph)
from app.train import setup

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("changes, device, expected", [
    ({}, CUDA, True),
    ({}, CPU, False),
    ({"cuda_graph": False}, CUDA, False),
    ({"compile": "reduce-overhead"}, CUDA, False),  # compile makes its own graphs
    ({"watch_log": "parameters"}, CUDA, False),  # forward hooks must fire on every step
    ({"watch_log": "all"}, CUDA, False),
    ({"watch_log": "none"}, CUDA, True),
    ({"amp": "bf16"}, CUDA, True),
])
def test_which_runs_use_the_cuda_graph(changes, device, expected):
    assert uses_cuda_graph(Config(**changes), device) is expected


def test_cpu_steps_are_eager_and_train():
    torch.manual_seed(0)
    cfg = Config(batch_size=8)
    model, optimizer = build_model(cfg, CPU)
    x = torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    split = data.Split((x * 40 + 128).clamp(0, 255).to(torch.uint8), y)
    fmt = dict(mean=0.5, std=0.25, channels_last=True)
    eager, step = make_steps(model, optimizer, nn.CrossEntropyLoss(), cfg, CPU, split, fmt, contextlib.nullcontext)
    assert step is eager and isinstance(step, EagerStep)
    batches = data.Batches(split, 8, shuffle=False, **fmt)
    first = [step(bx, by).item() for bx, by in batches]
    for _ in range(20):
        last = [step(bx, by).item() for bx, by in batches]
    assert sum(last) < 0.5 * sum(first)  # 64 fixed examples: the loss must fall


def test_optimizer_step_updates_exactly_as_torch_step_does():
    """The step without torch's dynamo-importing wrapper: the same weights and Adam state, bit for bit."""
    models, optimizers = zip(*(build_model(Config(), CPU) for _ in range(2)))
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(3):
        for model, optimizer, step in zip(models, optimizers, (lambda o: o.step(), optimizer_step)):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            step(optimizer)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b) and a.grad is not None
    states = [o.state_dict()["state"] for o in optimizers]
    assert states[0].keys() == states[1].keys() and len(states[0]) == len(list(models[0].parameters()))
    for i in states[0]:
        assert all(torch.equal(states[0][i][k], states[1][i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_optimizer_step_runs_registered_hooks_through_torch():
    model, optimizer = build_model(Config(), CPU)
    seen = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append(opt))
    nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.randint(0, 10, (4,))).backward()
    optimizer_step(optimizer)
    assert seen == [optimizer] and optimizer.state


@pytest.mark.slow
def test_each_compile_in_a_warm_process_compiles_afresh():
    """A sweep agent compiles one model per run in one process: past dynamo's recompile limit (lowered
    here to 1 so that two models show it) torch.compile alone falls back to eager; compile_model does not."""
    import logging

    import torch._dynamo

    class Warnings(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    def limit_hit(compile_fn) -> bool:
        seen = Warnings()
        logger = logging.getLogger("torch._dynamo")
        logger.addHandler(seen)
        try:
            torch._dynamo.reset()
            with torch._dynamo.config.patch(recompile_limit=1):
                for width in (4, 5):  # another shape for each run, as a sweep over kernels gives
                    model = compile_fn(nn.Linear(width, 2), "default")
                    assert model(torch.ones(3, width)).shape == (3, 2)
        finally:
            logger.removeHandler(seen)
        return any("recompile_limit" in m for m in seen.messages)

    assert limit_hit(lambda model, mode: torch.compile(model, mode=mode))  # what the test guards against
    assert not limit_hit(compile_model)


def test_optimizer_flags_survive_a_checkpoint_from_another_mode():
    cfg = Config()
    _, optimizer = build_model(cfg, CPU)
    saved = optimizer.state_dict()
    saved["param_groups"][0].update(capturable=True, fused=True)  # as written by a CUDA-graph run
    optimizer.load_state_dict(saved)
    set_optimizer_flags(optimizer, cfg, CPU)
    assert optimizer.param_groups[0]["capturable"] is False and not optimizer.param_groups[0]["fused"]


def _train_one_epoch(graph: bool, ds: data.Dataset):
    cfg = Config(cuda_graph=graph, batch_size=128)
    torch.manual_seed(0)
    model, optimizer = build_model(cfg, CUDA)
    fmt = dict(mean=ds.mean, std=ds.std, channels_last=True)
    _, step = make_steps(model, optimizer, nn.CrossEntropyLoss(), cfg, CUDA, ds.train, fmt, contextlib.nullcontext)
    gen = torch.Generator(device=CUDA)
    gen.manual_seed(0)
    losses = [step(x, y).clone() for x, y in data.Batches(ds.train, 128, shuffle=True, generator=gen, **fmt)]
    return type(step), torch.stack(losses).cpu(), [p.detach().cpu() for p in model.parameters()]


@needs_cuda
def test_graphed_steps_train_like_eager_steps_including_a_short_last_batch(fashion_dir, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # eager and graph: the same kernels
    # 5000 val images held out, every 20th of the rest: 2750 images = 21 full batches + one of 62
    ds = data.load("fashion_mnist", str(fashion_dir), 5000, 20, CUDA)
    assert len(ds.train) % 128 != 0
    kind_e, loss_e, params_e = _train_one_epoch(False, ds)
    kind_g, loss_g, params_g = _train_one_epoch(True, ds)
    assert (kind_e, kind_g) == (EagerStep, GraphedStep)
    assert loss_g.shape == loss_e.shape == (22,)
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-4, atol=1e-5)  # the short batch's mean loss too
    # weights: the graph sums weighted per-example losses where eager takes their mean, and Adam scales
    # every update to ~lr whatever the gradient's size, so rounding in a near-zero gradient moves a weight
    # by up to ~1e-5 per step (measured on an H200: 2.6e-5 after 22 steps); skipped warm-up undo or a
    # wrong padding weight shows up as >= 1e-3
    for pg, pe in zip(params_g, params_e):
        torch.testing.assert_close(pg, pe, rtol=0, atol=2e-4)


@needs_cuda
def test_auto_picks_an_indexed_cuda_device_that_set_device_accepts():
    from app.train import pick_device

    device = pick_device(Config(device="auto"))
    assert device == torch.device("cuda", 0)
    torch.cuda.set_device(device)  # refuses a bare torch.device("cuda") on torch 2.11 and later


# --- losses read without a sync ---

def _reference_losses(cfg: Config) -> list[tuple[int, int, float]]:
    """(step, epoch, loss) as a loop that blocks on `.item()` at every log point logs them, from train()'s
    own setup and model: the history train() wrote before its reads stopped waiting for the device."""
    s = setup(cfg)
    model, optimizer = build_model(cfg, s.device)
    step = EagerStep(model, optimizer, nn.CrossEntropyLoss(), contextlib.nullcontext)
    rows, examples = [], 0
    for epoch in range(cfg.epochs):
        loss_sum, n = torch.zeros(()), 0
        for i, (x, y) in enumerate(s.train):
            loss_sum += step(x, y)
            n += 1
            examples += y.shape[0]
            if (i + 1) % cfg.log_interval == 0:
                rows.append((examples, epoch, loss_sum.item() / n))
                loss_sum.zero_()
                n = 0
    return rows


def test_logged_losses_equal_a_blocking_read_at_every_log_point(tmp_path: Path, small_data: Path):
    settings = dict(DATA_DIR=str(small_data), EPOCHS="2", TRAIN_STRIDE="1", VAL_SIZE="200", BATCH_SIZE="32",
                    LOG_INTERVAL="4", SEED="3", WATCH_LOG="none", DEVICE="cpu")
    env = clean_env(tmp_path, **settings, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "runs"),
                    OUTPUT_DIR=str(tmp_path / "outputs"))
    proc = run_app(["train"], env, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [folder] = runlog.find(tmp_path / "runs")
    logged = [(row["_step"], row["epoch"], row["loss"]) for row in runlog.read(folder).history if "loss" in row]
    cfg = Config().replace(**{k.lower(): v for k, v in settings.items()})
    expected = _reference_losses(cfg)
    assert len(expected) == 2 * 8  # 31 full batches + 1 short per epoch: 8 log points each
    assert logged == expected  # exactly: same values, same steps, same order


def test_cpu_readings_come_back_at_their_own_push():
    readout = LossReadout(torch.device("cpu"))
    value = torch.tensor(2.5)
    for i in range(5):
        readout.push(value, i)
        value.zero_()  # the caller reuses its accumulator at once
        value += i
        assert readout.ready() == [(2.5 if i == 0 else float(i - 1), i)]
    assert readout.drain() == []


def test_readings_pushed_without_a_read_in_between_are_all_handed_back_in_order():
    # more pushes than buffers: the ring frees a buffer by reading it, and that reading is kept, not lost
    readout = LossReadout(torch.device("cpu"), slots=3)
    for i in range(7):
        readout.push(torch.tensor(float(i)), i)
    assert readout.drain() == [(float(i), i) for i in range(7)]


@needs_cuda
def test_cuda_readings_never_wait_for_the_newest_and_lag_one_interval_at_most():
    readout = LossReadout(CUDA)
    total = torch.zeros((), device=CUDA)
    big = torch.randn(4096, 4096, device=CUDA)
    values = []
    for i in range(4):
        total += i + 0.5
        values.append(i + 0.5)
        readout.push(total, i)
        total.zero_()
        for _ in range(20):  # keep the device busy well past the host
            big = (big @ big).tanh_()
        got = readout.ready()
        # everything older than the newest has been waited for; the newest is still queued behind the work
        assert [meta for _, meta in got] == ([] if i == 0 else [i - 1])
        assert [v for v, _ in got] == values[i - 1:i]
    assert readout.drain() == [(3.5, 3)]
