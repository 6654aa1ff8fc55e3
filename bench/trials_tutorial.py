"""One run of the W&B tutorial's script (bench/tutorial.py) with train()'s phase marks, for bench/trials.py.

The tutorial's `model_pipeline`: wandb.init, make (data, loaders, model), train, test, then its ONNX
export saved to the run (`torch.onnx.export` + `wandb.save`; it has no check and no artifact).
"""

from __future__ import annotations

import os


def run_tutorial_trial(data_dir: str, device: str, seed: str, work: str) -> None:
    import torch
    import wandb

    import tutorial
    from app import phases

    phases.mark("start")
    device_ = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    config = {"epochs": int(os.environ.get("EPOCHS", "1")), "classes": 10, "kernels": [16, 32], "batch_size": 128,
              "learning_rate": 0.005, "dataset": "FashionMNIST", "architecture": "CNN",
              "train_stride": int(os.environ.get("TRAIN_STRIDE", "500"))}
    torch.manual_seed(int(seed))
    os.makedirs(work, exist_ok=True)
    phases.mark("checks")
    with wandb.init(project="tutorial", config=config, dir=work, mode="offline") as run:
        phases.mark("wandb_init")
        train_set = tutorial.get_data(data_dir, slice=config["train_stride"], train=True)
        test_set = tutorial.get_data(data_dir, slice=1, train=False)
        train_loader = tutorial.make_loader(train_set, config["batch_size"], device_)
        test_loader = tutorial.make_loader(test_set, config["batch_size"], device_)
        phases.mark("data")
        model = tutorial.ConvNet(config["kernels"], config["classes"]).to(device_)
        criterion = torch.nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
        phases.mark("model")
        tutorial.train(model, train_loader, criterion, optimizer, config, run, device_)
        phases.mark("training")
        images, _ = next(iter(test_loader))
        tutorial.test(model, test_loader, run, device_)
        phases.mark("evaluation")
        path = os.path.join(run.dir, "model.onnx")
        torch.onnx.export(model, images.to(device_), path, dynamo=False)
        run.save(path)
        phases.mark("export")
    phases.mark("finish")
