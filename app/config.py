"""The one typed training config: its keys, their types and checks, and how values merge into it.

PRECEDENCE (the one place it is written; --help and docs/settings.md quote it), lowest first:
defaults < `.env` < environment (the key in upper case, e.g. EPOCHS=3) < command line (`--epochs=3`,
the form `wandb agent` passes with ${args}) < a W&B sweep's config.
An empty value (EPOCHS= in the environment or .env) is unset. An unknown key or a bad value is a
`ConfigError`: one line naming the key and what is allowed.

Reading those sources is app.settings' job (`settings.load`): this module imports nothing of the
package but app.errors, so every settings reader can build on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

from app.errors import UserError

PRECEDENCE = ("defaults < .env < environment (KEY in upper case, e.g. EPOCHS=3) < --key=value "
              "< a W&B sweep's values")


class ConfigError(UserError):
    """A setting a user got wrong."""


@dataclass(frozen=True)
class Config:
    # --- the tutorial's keys and defaults ---
    epochs: int = 5  # passes over the training subset
    classes: int = 10  # output classes of the ConvNet
    kernels: tuple[int, ...] = (16, 32)  # output channels of each conv block (1 to 3 blocks)
    batch_size: int = 128  # examples per optimizer step
    learning_rate: float = 0.005  # Adam step size
    dataset: str = "mnist"  # mnist | fashion_mnist (same IDX format)
    architecture: str = "CNN"  # recorded in the run's config; only CNN exists
    train_stride: int = 5  # train on every Nth training example (the tutorial's 5); 1 = all of them
    # --- reproducibility and held-out metric ---
    seed: int = 0  # seeds torch's generators (data order, init)
    val_size: int = 5000  # images for the per-epoch val_accuracy: from those train_stride skips, else the last N
    # --- where things live ---
    data_dir: str = "data"  # torchvision layout: <data_dir>/MNIST/raw, <data_dir>/FashionMNIST/raw
    output_dir: str = "outputs"  # per-run folder <output_dir>/<run id>/ with checkpoint.pt, model.onnx
    # --- device and speed ---
    device: str = "auto"  # auto (cuda if visible, else cpu) | cpu | cuda | cuda:N
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPU and tensor cores
    amp: str = "none"  # none | bf16 (autocast on CUDA)
    compile: str = "none"  # none | default | reduce-overhead (torch.compile; the latter uses CUDA graphs)
    cuda_graph: bool = True  # on CUDA with compile=none: capture the whole training step once, replay it
    gpu_memory_fraction: float = 0.0  # cap on this process's share of GPU memory; 0 = no cap
    # --- logging ---
    log_interval: int = 25  # batches between `loss` points (the tutorial's 25)
    watch_log: str = "gradients"  # run.watch: gradients | parameters | all | none
    watch_log_freq: int = 1000  # batches between run.watch histograms (the tutorial's 10 is costly)
    # --- checkpoints ---
    resume: bool = True  # continue from <output_dir>/<run id>/checkpoint.pt when it exists

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kernels"] = list(self.kernels)
        return d

    def replace(self, **changes: Any) -> "Config":
        """A copy with `changes` applied; values may be strings as from env or CLI."""
        return merge(self, changes, source="override")


DATASETS = ("mnist", "fashion_mnist")
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": DATASETS,
    "architecture": ("CNN",),
    "amp": ("none", "bf16"),
    "compile": ("none", "default", "reduce-overhead"),
    "watch_log": ("gradients", "parameters", "all", "none"),
}
POSITIVE = ("epochs", "classes", "batch_size", "train_stride", "log_interval", "watch_log_freq")
# the largest value of each, far beyond any real run or sweep: a bigger one passed the checks and then failed
# in an allocation or an overflow after the W&B run opened (train_stride and val_size: checked against the data)
MOST = {
    "epochs": 100_000,  # a run of 100k epochs is weeks even on the smallest subset; 10**12 only overflows later
    "classes": 100_000,  # the classifier's weights are classes x 1568 floats: 0.6 GB at 100k, 6 TB at 10**9
    "batch_size": 65_536,  # more than MNIST's 60k training images: a bigger batch is the same one-batch epoch
    "log_interval": 10**9,  # batches: more than any run makes, so the largest that changes anything
    "watch_log_freq": 10**9,
}
MOST_CHANNELS = 1024  # per conv block: 100k channels is a 37 GB activation for one batch of 128
SEED_RANGE = (-2**63, 2**63)  # torch.manual_seed's (and W&B's config's) 64-bit integer: >= 2**63 overflows
# the number forms a value may take: what a compose or shell user writes. int() and float() also take
# 1_000, non-ASCII digits (١٢) and surrounding Unicode space, which no .env user means as a number.
# inf and nan parse, so that learning_rate and gpu_memory_fraction refuse them with their own lines
INT_FORM = re.compile(r"[+-]?[0-9]+")
FLOAT_FORM = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)", re.I)
KEYS = tuple(f.name for f in fields(Config))
TRUE = ("1", "true", "yes", "on")  # the words of a true/false setting, here and in app.settings
FALSE = ("0", "false", "no", "off")
_TYPES = {f.name: f.type for f in fields(Config)}


def shown(value: Any, limit: int = 60) -> str:
    """A value as an error line shows it: repr, cut short (a sweep or a paste can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _check(c: Config) -> None:
    for key in POSITIVE:
        if getattr(c, key) < 1:
            raise ConfigError(f"{key}={getattr(c, key)} must be >= 1")
        if getattr(c, key) > MOST.get(key, math.inf):
            raise ConfigError(f"{key}={shown(getattr(c, key))} must be at most {MOST[key]}")
    for key, allowed in CHOICES.items():
        if getattr(c, key) not in allowed:
            raise ConfigError(f"{key}={shown(getattr(c, key))} must be one of: {', '.join(allowed)}")
    # each conv block halves the 28x28 image: more than three would leave nothing to pool
    if not 1 <= len(c.kernels) <= 3 or any(k < 1 for k in c.kernels):
        raise ConfigError(f"kernels={list(c.kernels)} must be 1 to 3 positive channel counts, e.g. 16,32")
    if any(k > MOST_CHANNELS for k in c.kernels):
        raise ConfigError(f"kernels={shown(list(c.kernels))} must be channel counts of at most {MOST_CHANNELS}")
    if not SEED_RANGE[0] <= c.seed < SEED_RANGE[1]:
        raise ConfigError(f"seed={shown(c.seed)} must be a 64-bit integer (-2**63 to 2**63-1), as torch.manual_seed takes")
    if not (c.learning_rate > 0 and math.isfinite(c.learning_rate)):
        raise ConfigError(f"learning_rate={c.learning_rate} must be > 0 and finite")
    if c.val_size < 0:
        raise ConfigError(f"val_size={c.val_size} must be >= 0")
    if not 0.0 <= c.gpu_memory_fraction <= 1.0:
        raise ConfigError(f"gpu_memory_fraction={c.gpu_memory_fraction} must be between 0 and 1")
    dev = c.device
    if not (dev in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]{1,3}", dev)):
        raise ConfigError(f"device={shown(dev)} must be auto, cpu, cuda or cuda:N")


def coerce(key: str, value: Any, source: str) -> Any:
    """Turn a value from a source (a string from env/CLI, or JSON-ish from W&B) into the key's type."""
    kind = _TYPES[key]
    where = f"{key}={shown(value)} (from {source})"
    if kind in ("int", int, "float", float):
        number, noun = (int, "an integer") if kind in ("int", int) else (float, "a number")
        if isinstance(value, bool):  # True is an int to Python, not to a user
            raise ConfigError(f"{where} is not {noun}")
        if number is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and not (INT_FORM if number is int else FLOAT_FORM).fullmatch(value.strip()):
            raise ConfigError(f"{where} is not {noun}")
        try:
            return number(str(value).strip())
        except ValueError:
            raise ConfigError(f"{where} is not {noun}") from None
    if kind in ("bool", bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        raise ConfigError(f"{where} is not a boolean (true/false)")
    if key == "kernels":
        items = value
        if isinstance(value, str):
            text = value.strip()
            try:
                items = json.loads(text) if text.startswith("[") else text.split(",")
            except (json.JSONDecodeError, RecursionError):  # RecursionError: "[[[[..." nested too deep
                raise ConfigError(f"{where} is not a list of integers like 16,32") from None
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where} is not a list of integers like 16,32")
        try:
            return tuple(_list_int(i) for i in items)
        except ValueError:
            raise ConfigError(f"{where} is not a list of integers like 16,32") from None
    return str(value).strip()


def _list_int(item: Any) -> int:
    """An item of a list key: an int from JSON or YAML, else text in the plain integer form."""
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    if not INT_FORM.fullmatch(str(item).strip()):
        raise ValueError(item)
    return int(str(item).strip())


def merge(base: Config, values: Mapping[str, Any], source: str) -> Config:
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown config key {shown(unknown[0])} (from {source}); known keys: {', '.join(KEYS)}")
    changes = {k: coerce(k, v, source) for k, v in values.items()}
    return dataclasses.replace(base, **changes)


def parse_cli(args: list[str]) -> dict[str, str]:
    """`--key=value` / `--key value` pairs, the forms `wandb agent` passes with ${args}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {shown(arg)}: settings are given as --key=value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{_cut(name)} needs a value: --{_cut(name)}=VALUE")
            value = args[i + 1]
            i += 1
        key = name.replace("-", "_")
        if key not in KEYS:
            raise ConfigError(f"unknown option --{_cut(name)}; known keys: {', '.join(KEYS)}")
        out[key] = value
        i += 1
    return out


def notes() -> dict[str, str]:
    """The comment beside each key in `Config`: its one-line meaning (--help, app.settings' table).
    Read from this file's text (inspect.getsource would cost every command a few ms at start-up)."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    body = source[source.index("\nclass Config:"):source.index("    def __post_init__")]
    return dict(re.findall(r"^    (\w+): [^=]+=[^#]+#\s*(.*)$", body, re.M))


def describe() -> str:
    """One line per key: default and the comment beside it in `Config`, for --help."""
    meanings = notes()
    defaults = Config().to_dict()
    rows = [(f"--{k}={json.dumps(defaults[k])}", meanings.get(k, "")) for k in KEYS]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {flag.ljust(width)}  {note}" for flag, note in rows)
