"""The training step: when the CUDA graph is used, and that a replayed graph trains exactly like eager steps."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from app import data
from app.config import Config
from app.step import EagerStep, GraphedStep
from app.train import build_model, make_steps, set_optimizer_flags, uses_cuda_graph

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
