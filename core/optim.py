"""Build torch optimizers from :class:`core.config.OptimizerConfig`: the client's
(:func:`build_optimizer`) and the server's (:func:`build_server_optimizer`)."""
from __future__ import annotations

import torch

from core.errors import UserError

FEDOPT_RULES = ("adam", "yogi", "adagrad")


class FedOpt(torch.optim.Optimizer):
    """The adaptive server optimizers of Reddi et al. 2021, "Adaptive Federated Optimization"
    (arXiv:2003.00295), Algorithm 2: FedAdam (``rule="adam"``), FedYogi (``"yogi"``) and FedAdagrad
    (``"adagrad"``), stepping on a pseudo-gradient ``g`` held in ``.grad`` (minus the paper's mean
    client delta, so ``g^2`` is the paper's ``Delta^2`` and the signs below are the paper's flipped)::

        m = b1 m + (1 - b1) g                          m starts at 0
        adam:    v = b2 v + (1 - b2) g^2               v starts at initial_v, by default eps^2
        yogi:    v = v - (1 - b2) g^2 sign(v - g^2)    (the paper's v_{-1} = tau^2; eps is tau)
        adagrad: v = v + g^2
        w = w - lr m / (sqrt(v) + eps)

    No bias correction. FedAdagrad has the momentum ``m`` too, as in the paper (``b1 = betas[0]``;
    ``b2`` is not used). ``weight_decay`` adds ``weight_decay * w`` to ``g`` first (L2, as torch's
    Adam does), or with ``decoupled_weight_decay`` multiplies ``w`` by ``1 - lr * weight_decay``
    before the step (as torch's AdamW does).

    Shapes: any; each parameter keeps ``m`` and ``v`` of its own shape in ``state`` (so twice its
    memory), saved and restored by ``state_dict`` / ``load_state_dict``.

    Raises:
        ValueError: an unknown ``rule``.
        UserError: ``load_state_dict`` of a state that holds other moments than ``m`` and ``v``
            (a torch optimizer's, e.g. a checkpoint written with ``server_form: torch``).
    """

    def __init__(self, params, lr: float, rule: str = "adam", betas=(0.9, 0.99), eps: float = 1e-3,
                 initial_v: float | None = None, weight_decay: float = 0.0, decoupled_weight_decay: bool = False):
        if rule not in FEDOPT_RULES:
            raise ValueError(f"FedOpt rule {rule!r}: choose one of {', '.join(FEDOPT_RULES)}")
        # rule and decoupling stay out of the param groups: load_state_dict replaces a group by the
        # saved one, and checkpoints of the former Yogi class hold only these five keys
        self.rule, self.decoupled_weight_decay = rule, decoupled_weight_decay
        initial_v = eps ** 2 if initial_v is None else initial_v
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, initial_v=initial_v, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        for moments in state_dict.get("state", {}).values():
            if set(moments) != {"m", "v"}:
                raise UserError(f"the saved server optimizer state holds {', '.join(sorted(map(str, moments)))}, not "
                                f"the m and v of Reddi et al.'s {self.rule}: it was written by torch's optimizer; "
                                f"resume with server_config.optimizer_config.server_form: torch")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a ``.grad`` (``closure`` is ignored)."""
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, group["initial_v"])
                grad = p.grad
                if decay and self.decoupled_weight_decay:
                    p.mul_(1 - lr * decay)
                elif decay:
                    grad = grad.add(p, alpha=decay)
                m, v, g2 = state["m"], state["v"], grad.square()
                m.mul_(b1).add_(grad, alpha=1 - b1)
                if self.rule == "adam":
                    v.mul_(b2).add_(g2, alpha=1 - b2)
                elif self.rule == "yogi":
                    v.sub_((1 - b2) * g2 * torch.sign(v - g2))
                else:
                    v.add_(g2)
                p.sub_(lr * m / (v.sqrt() + group["eps"]))


class Yogi(FedOpt):
    """FedYogi's server optimizer: :class:`FedOpt` with ``rule="yogi"`` (Yogi: Zaheer et al. 2018,
    NeurIPS; as a server optimizer: Reddi et al. 2021, arXiv:2003.00295). ``v`` starts at
    ``initial_v``, by default ``eps ** 2``; ``weight_decay`` is L2 (added to the gradient)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.99), eps: float = 1e-3, initial_v: float | None = None,
                 weight_decay: float = 0.0):
        super().__init__(params, lr, "yogi", betas, eps, initial_v, weight_decay)


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay), torch's Adam, AdamW or Adagrad, or :class:`Yogi` over
    ``params``: the client optimizer, and the server's under ``server_form: torch``."""
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


def build_server_optimizer(params, cfg) -> torch.optim.Optimizer:
    """The server optimizer of ``server_config.optimizer_config`` over ``params`` (the global
    model's parameters, stepped on the pseudo-gradient).

    ``sgd`` is torch's SGD (FedAvg, FedAvgM). ``adam``, ``yogi`` and ``adagrad`` are
    :class:`FedOpt`, Reddi et al. 2021's Algorithm 2 (FedAdam, FedYogi, FedAdagrad), and ``adamw``
    is FedAdam with decoupled weight decay; unless ``cfg.server_form`` is ``torch``: then every
    type is what :func:`build_optimizer` builds (torch's Adam, AdamW, Adagrad; :class:`Yogi`,
    which is FedYogi either way). ``server_form`` None counts as ``fedopt``.
    """
    if cfg.type == "sgd" or getattr(cfg, "server_form", None) == "torch":
        return build_optimizer(params, cfg)
    rule = "adam" if cfg.type == "adamw" else cfg.type
    return FedOpt(list(params), lr=cfg.lr, rule=rule, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                  decoupled_weight_decay=cfg.type == "adamw")
