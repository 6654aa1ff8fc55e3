"""ConvNet on MNIST tracked with Weights & Biases: one `train(config)` for single runs and sweep trials."""

__version__ = "0.1.0"
