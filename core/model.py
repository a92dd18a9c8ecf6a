"""The model contract every task implements (FLUTE-compatible)."""
from __future__ import annotations

import torch
from torch import nn


class BaseModel(nn.Module):
    """A task's model. Subclasses are built as ``Model(model_config)`` and implement:

    - ``loss(batch) -> Tensor``: a scalar training loss for one batch (a dict of device tensors).
    - ``inference(batch) -> dict``: ``output`` (the model output), ``acc`` (a 0-dim tensor, fraction
      of correct predictions in the batch), ``batch_size`` (int). Optionally ``correct``: a (B,)
      tensor of per-sample correctness, which lets evaluation pass over many clients' samples at
      once; and ``loss``: a (B,) tensor of per-sample losses, with which every evaluation also
      reports each client's mean test loss (global and personalized). Other keys are ignored.

    The engine never calls ``.item()`` inside the client loop, so return tensors, not floats.

    ``OPTIONS`` names the keys of ``model_config.options`` the class reads; any other key is a
    config error (a mistyped option is never silently ignored).
    """

    OPTIONS: tuple[str, ...] = ()

    def __init__(self, model_config=None):
        super().__init__()
        self.model_config = model_config

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean training loss of ``batch`` (a dict of tensors on the model's device) as a 0-dim tensor
        that autograd can differentiate. Raises NotImplementedError until a task overrides it."""
        raise NotImplementedError

    def inference(self, batch: dict) -> dict:
        """Evaluation outputs of ``batch``: ``output``, ``acc`` (0-dim), ``batch_size`` and optional
        ``correct`` (B,) and ``loss`` (B,), as the class docstring lists. Raises NotImplementedError
        until a task overrides it."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        """Number of trainable parameters (elements)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def training_loss(model: nn.Module, client_config):
    """The callable ``batch -> loss`` the engine trains with: ``model.loss``, under
    ``torch.compile(mode=client_config.compile_mode)`` when ``client_config.compile`` is on.

    Compiling keeps the model's parameters as they are (the engine resets them in place, so a
    compiled graph, and on a GPU a CUDA graph, stays valid across clients). A new batch size or a
    change of which parameters train (personalization phases) compiles once more.

    In the modes that replay CUDA graphs (``reduce-overhead``, ``max-autotune``), a graph's output
    lives in memory that the next replay overwrites, and the engine keeps every step's loss until
    the client ends; the loss is cloned out of that memory (one scalar copy per step).
    """
    if not client_config.compile:
        return model.loss
    compiled = torch.compile(model.loss, mode=client_config.compile_mode)  # type: ignore[arg-type]  # a bound method
    if client_config.compile_mode not in CUDA_GRAPH_MODES:
        return compiled
    return lambda batch: compiled(batch).clone()
