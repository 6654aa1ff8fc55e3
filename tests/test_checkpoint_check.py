"""A checkpoint is untrusted input: whatever it holds, the check says yes or one line naming the file.

    .venv/bin/python -m pytest -q tests/test_checkpoint_check.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.config import Config
from app.errors import UserError
from app.model import ConvNet

CONFIG = Config(kernels=[4, 8], classes=10, epochs=3, device="cpu")  # the CPU generator's state below
PATH = Path("outputs/run00001/checkpoint.pt")


def good_state(config: Config = CONFIG) -> dict:
    """What train() writes after one step: model, Adam state, counters, generator, config."""
    model = ConvNet(config.kernels, config.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    model(torch.zeros(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=1, examples_seen=64,
                epoch_examples=0, generator=torch.Generator().get_state(), config=config.to_dict(), run_id="run00001",
                val_loss=0.5, val_accuracy=0.8)


GOOD = good_state()


def test_what_train_writes_passes():
    from app import checkpoint

    checkpoint.check_state(good_state(), CONFIG, PATH)


def test_a_checkpoint_from_before_the_val_metrics_were_kept_passes():
    from app import checkpoint

    state = good_state()
    del state["val_loss"], state["val_accuracy"]
    checkpoint.check_state(state, CONFIG, PATH)
    assert checkpoint.last_val(state) == {}


CUDA_GENERATOR = torch.zeros(16, dtype=torch.uint8)  # what torch.cuda's generator get_state() gives: seed, offset


@pytest.mark.parametrize("generator, device, written, trains", [
    (CUDA_GENERATOR, "cpu", "CUDA", "the CPU"),
    (None, "cuda", "the CPU", "CUDA"),
    (None, "cuda:1", "the CPU", "CUDA"),
], ids=["cuda-checkpoint-on-cpu", "cpu-checkpoint-on-cuda", "cpu-checkpoint-on-cuda-1"])
def test_a_checkpoint_of_the_other_device_type_is_refused_in_one_line(generator, device, written, trains):
    from app import checkpoint

    state = good_state()
    if generator is not None:
        state["generator"] = generator
    config = CONFIG.replace(device=device)
    with pytest.raises(UserError) as refused:
        checkpoint.check_state(state, config, PATH)
    line = str(refused.value)
    assert "\n" not in line and str(PATH) in line, line
    assert f"written training on {written} but this run trains on {trains} (device={device})" in line, line
    assert "resume=false" in line
    # on its own device type the same checkpoint passes
    checkpoint.check_state(state, CONFIG.replace(device="cuda" if generator is not None else "cpu"), PATH)


JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                 st.lists(st.integers(1, 9), min_size=0, max_size=4).map(lambda s: torch.zeros(s)),
                 st.just(torch.zeros(3, dtype=torch.uint8)))


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(sorted(set(GOOD) - {"run_id"})), value=JUNK)
def test_any_entry_replaced_is_accepted_only_when_it_fits(key, value):
    from app import checkpoint

    state = good_state()
    state[key] = value
    try:
        checkpoint.check_state(state, CONFIG, PATH)
    except UserError as exc:
        line = str(exc)
        assert str(PATH) in line and "\n" not in line and len(line) < 400
        return
    # accepted: only where the value is one train() could have written there (a config's settings are
    # compared where it names them; the weights' shapes are checked whatever it says)
    assert ((key in ("epoch", "examples_seen", "epoch_examples") and type(value) is int and value >= 0)
            or (key == "config" and isinstance(value, dict))
            or (key in ("val_loss", "val_accuracy") and type(value) is float)), (key, value)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(list(GOOD["model"])), shape=st.lists(st.integers(1, 40), min_size=0, max_size=4))
def test_a_weight_of_another_shape_is_refused(name, shape):
    from app import checkpoint

    state = good_state()
    state["model"][name] = torch.zeros(shape)
    if list(GOOD["model"][name].shape) == shape:
        checkpoint.check_state(state, CONFIG, PATH)
    else:
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            checkpoint.check_state(state, CONFIG, PATH)


def test_weights_for_other_settings_are_refused_by_shape():
    from app import checkpoint

    state = good_state(Config(kernels=[4, 16], classes=10))
    del state["config"]["kernels"]  # an older or foreign config: the weights' shapes still tell
    with pytest.raises(UserError, match="features.3.weight"):
        checkpoint.check_state(state, CONFIG, PATH)


def test_a_sweep_retry_says_why_it_does_not_resume_a_checkpoint_of_the_other_device_type(tmp_path, capsys):
    from types import SimpleNamespace

    from app.sweep.optuna import trial as sweep_trial

    config = CONFIG.replace(output_dir=str(tmp_path))
    (tmp_path / "deadrun1").mkdir()
    state = good_state()
    state["generator"] = CUDA_GENERATOR
    torch.save(state, tmp_path / "deadrun1" / "checkpoint.pt")
    retry = SimpleNamespace(number=7, user_attrs={"resume_run": "deadrun1"})
    assert sweep_trial._resume_from(retry, config, "newrun01", "val_loss") == ""
    assert not (tmp_path / "newrun01").exists()
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("[offline-sweep] trial 7: not resuming run deadrun1's checkpoint, training from the start ("), line
    assert str(tmp_path / "deadrun1" / "checkpoint.pt") in line and "written training on CUDA" in line
    # on its own device type the same checkpoint is resumed
    assert sweep_trial._resume_from(retry, config.replace(device="cuda"), "newrun01", "val_loss") == \
        ", resuming from run deadrun1's checkpoint after epoch 1"


@pytest.mark.parametrize("where, poison", [
    ("features.0.weight", float("nan")), ("fc.bias", float("inf")),
    ("optimizer exp_avg_sq of parameter 4", float("inf")), ("optimizer exp_avg of parameter 0", float("nan")),
])
def test_a_checkpoint_holding_non_finite_weights_is_refused_in_one_line(where, poison):
    """A diverged run's weights or Adam moments: every step from them is NaN, so no resume starts there."""
    from app import checkpoint

    state = good_state()
    if where.startswith("optimizer"):
        key, index = where.split()[1], int(where.split()[-1])
        state["optimizer"]["state"][index][key].view(-1)[0] = poison
    else:
        state["model"][where].view(-1)[-1] = poison
    with pytest.raises(UserError) as refused:
        checkpoint.check_state(state, CONFIG, PATH)
    line = str(refused.value)
    assert line == (f"checkpoint {PATH} holds NaN or infinite values in {where} (a diverged run's weights): training "
                    "cannot continue from it; delete it to train this run again, or set resume=false"), line
    assert checkpoint.nonfinite(good_state()["model"]) is None
