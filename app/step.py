"""One training step (forward, backward, optimizer update), run eagerly or replayed as one CUDA graph,
how train() builds the model, the optimizer and its step, and the evaluation pass.

On a GPU this model is far too small to keep the device busy: an eager step is ~100 operators dispatched
one by one from Python, and the step's time is that dispatch, not the arithmetic. Capturing the whole step
once and replaying it costs one launch per step.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim import optimizer as _optim

from app import data
from app.config import Config
from app.model import ConvNet


class EagerStep:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        self.model, self.optimizer, self.criterion, self.autocast = model, optimizer, criterion, autocast

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss, left on the device."""
        with self.autocast():
            loss = self.criterion(self.model(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(self.optimizer)
        return loss.detach()


class ShardStep:
    """One rank's step of a trial on several ranks (its model wrapped in DistributedDataParallel).

    Each rank holds part of a batch of `total` examples; DDP averages the ranks' gradients, so each rank
    back-propagates sum(its losses) * ranks / total: the average is then exactly the gradient of the
    whole batch's mean loss, as one rank computes it, whatever the shares (a short last batch included).
    Returns this rank's part of the batch's mean loss: summed over the ranks, the batch's mean loss."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ranks: int,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        self.model, self.optimizer, self.ranks, self.autocast = model, optimizer, ranks, autocast

    def __call__(self, x: torch.Tensor, y: torch.Tensor, total: int) -> torch.Tensor:
        with self.autocast():
            logits = self.model(x)
        part = F.cross_entropy(logits.float(), y, reduction="sum") / total
        self.optimizer.zero_grad(set_to_none=True)
        (part * self.ranks).backward()
        optimizer_step(self.optimizer)
        return part.detach()


class GraphedStep:
    """The step captured as a CUDA graph for batches of up to `sample_x.shape[0]` examples.

    A graph replays fixed shapes, so a shorter batch (an epoch's last) is copied into the front of the
    static batch and the rest gets loss weight 0: the loss is sum(weight_i * ce_i) with weight 1/n for
    the n real examples, i.e. exactly their mean, and the padding contributes no gradient.

    Capture needs warm-up steps first (cuDNN picks its kernels, Adam creates its state); they run on the
    sample batch and are then undone, so the run trains exactly as the eager step would.
    The optimizer must be a CUDA-graph-capturable one (Adam(capturable=True)).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sample_x: torch.Tensor,
                 sample_y: torch.Tensor, bf16: bool, warmup_steps: int = 3):
        self.batch = sample_x.shape[0]
        self.x, self.y = sample_x.clone(), sample_y.clone()  # clone keeps channels_last
        self.weight = torch.full((self.batch,), 1.0 / self.batch, device=sample_x.device)
        self.n = self.batch
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def step() -> torch.Tensor:
            # the autocast cache must be off under capture: cached casts would outlive the graph's pool
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if bf16 else contextlib.nullcontext():
                logits = model(self.x)
            loss = (F.cross_entropy(logits.float(), self.y, reduction="none") * self.weight).sum()
            loss.backward()
            optimizer_step(optimizer)
            return loss.detach()

        with torch.no_grad():
            params_before = [p.detach().clone() for p in params]
            state_before = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in optimizer.state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                optimizer.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)  # backward in the graph then writes fresh .grad, never adds
        with torch.cuda.graph(self.graph):
            self.loss = step()
        with torch.no_grad():  # undo the warm-up, in place: the graph holds these very tensors
            for p, before in zip(params, params_before):
                p.copy_(before)
            for p, state in optimizer.state.items():
                before = state_before.get(p)
                for k, v in state.items():
                    if torch.is_tensor(v):
                        v.copy_(before[k]) if before is not None else v.zero_()  # Adam starts from zeros

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = y.shape[0]
        if n > self.batch:
            raise ValueError(f"batch of {n} > the captured {self.batch}")
        if n != self.n:
            self.weight.zero_()[:n] = 1.0 / n
            self.n = n
        self.x[:n].copy_(x)
        self.y[:n].copy_(y)
        self.graph.replay()
        return self.loss  # overwritten by the next replay: read or accumulate it before that


def uses_cuda_graph(config: Config, device: torch.device) -> bool:
    """Whether training replays the step as a CUDA graph. Not with torch.compile (reduce-overhead makes its
    own graphs) nor with parameter histograms: their forward hooks would have to fire on every replay."""
    return (device.type == "cuda" and config.cuda_graph and config.compile == "none"
            and config.watch_log in ("gradients", "none"))


# torch.optim imports torch._dynamo the first time an optimizer runs (~1 s of CPU, a sixth of a whole
# minimal trial in a process of its own): Optimizer's add_param_group, zero_grad, state_dict and
# load_state_dict are wrapped so that torch.compile never traces into them, and that wrapper imports
# dynamo to build itself on its first call; step() imports it to place graph breaks. Here no optimizer
# call ever runs inside a compiled function (compile=... compiles the model's forward only), so the
# wrappers are given their unwrapped function and step() is called under no_grad as its wrapper would.
# Where torch's wrappers look different (another torch), both fall back to torch's own calls.
_DYNAMO_WRAPPED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def _skip_dynamo_wrappers() -> None:
    for name in _DYNAMO_WRAPPED:
        inner = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if inner is not None and not hasattr(inner, "__dynamo_disable"):
            setattr(inner, "__dynamo_disable", inner)  # torch._compile._disable_dynamo's cache of its wrapper


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step() as its wrappers run it (no gradients, no hooks registered here), without
    importing torch._dynamo."""
    inner = type(optimizer).step
    while hasattr(inner, "__wrapped__"):
        inner = inner.__wrapped__
    if (inner is type(optimizer).step or optimizer.defaults.get("differentiable")
            or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or getattr(_optim, "_global_optimizer_pre_hooks", None) or getattr(_optim, "_global_optimizer_post_hooks", None)):
        optimizer.step()
        return
    with torch.no_grad():
        inner(optimizer)


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile for one run, as in a fresh process. A sweep agent runs many in one process, and dynamo
    keeps every earlier run's graphs: each model shape the sweep tries (kernels) and each batch and
    train/eval variant add one to the function's recompile limit (8), past which a run trains
    uncompiled with a warning. Resetting dynamo first makes each run compile as its own process would."""
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(model, mode=mode)


def build_model(config: Config, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    _skip_dynamo_wrappers()
    model = ConvNet(config.kernels, config.classes).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    set_optimizer_flags(optimizer, config, device)
    return model, optimizer


def set_optimizer_flags(optimizer: torch.optim.Optimizer, config: Config, device: torch.device) -> None:
    """Also after loading a checkpoint, which brings back the flags of the run that wrote it.

    fused on CUDA: one kernel updates every parameter where the default issues several per step (on the
    CPU fused measured no faster); capturable: the step counter stays on the device, as graph capture needs.
    """
    for group in optimizer.param_groups:
        group.update(fused=device.type == "cuda" or None, capturable=uses_cuda_graph(config, device),
                     foreach=None)


def make_steps(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, config: Config,
               device: torch.device, train: data.Split, fmt: dict, autocast) -> tuple[EagerStep, EagerStep | GraphedStep]:
    """(eager step, the step to use): the graphed one is captured on the first (unshuffled) batch."""
    eager = EagerStep(model, optimizer, criterion, autocast)
    if not uses_cuda_graph(config, device):
        return eager, eager
    x, y = next(iter(data.Batches(train, config.batch_size, shuffle=False, **fmt)))
    if y.shape[0] < config.batch_size:
        return eager, eager  # fewer examples than one batch: nothing to gain
    return eager, GraphedStep(model, optimizer, x, y, bf16=config.amp == "bf16")


def ddp_step(model, optimizer, config: Config, device: torch.device, team, autocast) -> ShardStep:
    """The step of a rank among several. compile and cuda_graph are one rank's (this one place turns them
    off): a graph captured around DDP's gradient all-reduce, or dynamo's split of a DDP model, are not
    what they were measured as, so N > 1 trains eagerly."""
    from torch.nn.parallel import DistributedDataParallel

    if team.lead and (config.compile != "none" or uses_cuda_graph(config, device)):
        print(f"GPUS_PER_TRIAL={team.size}: compile and cuda_graph apply to one rank; this run trains eagerly", flush=True)
    wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ShardStep(wrapped, optimizer, team.size, autocast)


def evaluate(model: nn.Module, batches: data.Batches, criterion: nn.Module, autocast, team=None,
             examples: int | None = None) -> tuple[float, float]:
    """Mean loss and accuracy; sums stay on the device and cross to the host once. With a `team` of ranks
    (app.ranks), `batches` is this rank's shard of `examples`: the sums are added over the ranks first."""
    model.eval()
    loss_sum = torch.zeros((), device=batches.split.labels.device)
    correct = torch.zeros((), device=batches.split.labels.device, dtype=torch.long)
    with torch.no_grad(), autocast():
        for x, y in batches:
            logits = model(x)
            loss_sum += criterion(logits.float(), y) * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
    model.train()
    if team is not None and team.size > 1:
        sums = team.sum(torch.stack([loss_sum.double(), correct.double()]))
        return sums[0].item() / examples, sums[1].item() / examples
    n = len(batches.split)
    return loss_sum.item() / n, correct.item() / n
