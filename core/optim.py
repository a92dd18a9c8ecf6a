"""Build torch optimizers from :class:`core.config.OptimizerConfig` (client and server side)."""
from __future__ import annotations

import torch


class Yogi(torch.optim.Optimizer):
    """Yogi (Zaheer et al. 2018, NeurIPS), as the server optimizer of FedYogi (Reddi et al. 2021,
    arXiv:2003.00295): ``m = b1 m + (1-b1) g``; ``v = v - (1-b2) g^2 sign(v - g^2)``;
    ``w = w - lr m / (sqrt(v) + eps)``. No bias correction; ``v`` starts at ``initial_v``, by default
    ``eps ** 2`` (the paper's ``v_{-1} = tau^2``).
    ``weight_decay`` adds ``weight_decay * w`` to ``g`` first (L2, as torch's Adam does).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.99), eps: float = 1e-3, initial_v: float | None = None,
                 weight_decay: float = 0.0):
        initial_v = eps ** 2 if initial_v is None else initial_v
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, initial_v=initial_v, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """One Yogi update of every parameter that has a ``.grad`` (``closure`` is ignored)."""
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, group["initial_v"])
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                g2 = grad.square()
                state["m"].mul_(b1).add_(grad, alpha=1 - b1)
                state["v"].sub_((1 - b2) * g2 * torch.sign(state["v"] - g2))
                p.sub_(group["lr"] * state["m"] / (state["v"].sqrt() + group["eps"]))


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay), Adam, AdamW, Adagrad or Yogi over ``params``."""
    params = list(params)
    if cfg.type == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.type == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.type == "yogi":
        return Yogi(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.type == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
