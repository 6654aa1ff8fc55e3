"""ONNX export, checked with onnxruntime against the torch model before anyone relies on it."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.errors import UserError
from app.model import Normalized

# float32 logits agree to ~1e-6 of their scale, whatever the scale: a model trained with a high learning rate
# reaches logits of 1e6+, where onnxruntime's and torch's sums (added in other orders) differ by 0.1 and more
# while every image's class agrees. So each logit must agree within RTOL of its image's largest |logit|
# (plus ATOL, for logits near 0), and every image's argmax must agree
ATOL, RTOL = 1e-4, 1e-4


class ExportError(RuntimeError):
    pass


def export_onnx(model: nn.Module, mean: float, std: float, sample: torch.Tensor, path: Path) -> dict:
    """Write `path` for input float32 [N, 1, 28, 28] in [0, 1] (dynamic N) and verify it.

    `sample` is a batch of real uint8 images. Returns the verification numbers.
    """
    net = Normalized(copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format), mean, std).eval()
    images = sample.detach().cpu().float().div(255.0)
    tmp = path.with_suffix(".onnx.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter is chatty about things that don't apply here
            torch.onnx.export(
                # traced on two images: the batch axis is dynamic, the file is byte for byte the one a trace of
                # the whole sample writes, and the trace's forward pass costs 1/128 of it
                net, (images[:2],), str(tmp), input_names=["images"], output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
            )
    except OSError as exc:  # the volume filled up or turned read-only: no half-written file, any older model kept
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the ONNX model {path} ({exc.strerror or exc}); nothing half-written is left and "
                        "the checkpoint of the last epoch is kept: free space or make the folder writable, then rerun "
                        "this run id to test and export it") from None
    # the torch side of the check in the memory format the model trained in: on the CPU a channels_last
    # forward of the sample is ~4x faster than the contiguous copy the exporter needs (same weights)
    reference = Normalized(copy.deepcopy(model).float().cpu(), mean, std).eval()
    try:
        result = verify(tmp, reference, images)
    except ExportError:
        tmp.unlink(missing_ok=True)  # a refused model leaves no file behind
        raise
    os.replace(tmp, path)  # only a verified model gets the real name
    return result


def verify(path: Path, net: nn.Module, images: torch.Tensor) -> dict:
    """The ONNX file at `path` against `net` on `images`: finite logits, each within ATOL + RTOL x its
    image's largest |logit| of torch's, and the same class for every image. ExportError otherwise."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        want = net(images).numpy()
    if not np.isfinite(want).all():
        raise ExportError("the model's logits are not finite (NaN or inf): its weights diverged; nothing to export")
    diff = np.abs(got - want)
    max_diff = float(diff.max())
    agree = float((got.argmax(1) == want.argmax(1)).mean())
    scale = np.abs(want).max(axis=1, keepdims=True)  # each image's largest |logit|
    if not (diff <= ATOL + RTOL * scale).all() or agree < 1.0:  # NaN in `got` compares False: refused
        raise ExportError(f"ONNX export disagrees with torch: max |diff| {max_diff:.2e} (logits up to "
                          f"{float(scale.max()):.2e}), argmax agreement {agree:.4f}")
    return {"onnx_max_abs_diff": max_diff, "onnx_argmax_agreement": agree, "onnx_checked_images": len(images)}
