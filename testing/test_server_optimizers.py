"""The server optimizers FedAdam, FedYogi and FedAdagrad follow Reddi et al. 2021 ("Adaptive Federated
Optimization", arXiv:2003.00295), Algorithm 2, by default (issue 23), checked against a float64
transcription of the algorithm written here; ``server_form: torch`` keeps torch's optimizers."""
from __future__ import annotations

import copy
import io
import random

import numpy as np
import pytest
import torch

import core.server
from core.config import OptimizerConfig, config_difference, validate_config, with_defaults
from core.errors import UserError
from core.optim import FedOpt, build_optimizer, build_server_optimizer
from core.checkpoint import load_checkpoint, save_atomic

RULES = ("adam", "yogi", "adagrad")
U = 2.0 ** -24  # unit roundoff of float32: one rounding moves a value by at most U times its size


def algorithm2(rule, x0, deltas, lr, betas, tau, weight_decay=0.0, decoupled=False):
    """Reddi et al. 2021, Algorithm 2, in float64 and the paper's terms: ``deltas`` are the mean
    client deltas Delta_t (minus the pseudo-gradient), ``m_{-1} = 0``, ``v_{-1} = tau^2``,
    ``x_{t+1} = x_t + lr m_t / (sqrt(v_t) + tau)``, no bias correction; FedAdagrad has the momentum
    ``m`` too. Weight decay: L2 (``Delta - wd x``, the pseudo-gradient plus ``wd x``) or decoupled
    (``x (1 - lr wd)`` before the step).

    Returns, for each step, the new x and a bound on the float32 rounding error of an
    implementation (see :func:`float32_bound`): ``|x_t| + sum_{s<=t} lr mabs_s / (sqrt(v_s) + tau)``,
    with ``mabs`` the moment of ``|Delta|`` (what ``m`` would be without cancellation).
    """
    b1, b2 = betas
    x = np.asarray(x0, np.float64)
    m, v, mabs, steps = np.zeros_like(x), np.full_like(x, tau ** 2), np.zeros_like(x), np.zeros_like(x)
    out = []
    for delta in deltas:
        d = np.asarray(delta, np.float64)
        if weight_decay and decoupled:
            x = x - lr * weight_decay * x
        elif weight_decay:
            d = d - weight_decay * x
        m = b1 * m + (1 - b1) * d
        mabs = b1 * mabs + (1 - b1) * np.abs(d)
        if rule == "adagrad":
            v = v + d * d
        elif rule == "yogi":
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        else:
            v = b2 * v + (1 - b2) * d * d
        x = x + lr * m / (np.sqrt(v) + tau)
        steps = steps + lr * mabs / (np.sqrt(v) + tau)
        out.append((x.copy(), np.abs(x) + steps))
    return out


def float32_bound(t: int) -> float:
    """Relative float32 error allowed after ``t`` steps, in units of the bound of :func:`algorithm2`.

    First-order worst case: a step rounds the new ``m`` three times (two products, one sum: 3U of
    ``mabs``) and ``v`` three times (3U relative; its terms are positive, or for Yogi the term
    subtracted is at most (1 - b2) of ``v``); the errors of earlier steps carry on, scaled by b1 or
    b2 < 1, so after t steps ``m`` is within 3tU of ``mabs`` and ``v`` within 3tU relative, so
    ``sqrt(v)`` 1.5tU; sqrt, + tau, the division and lr * add 4U; subtracting the step from ``x``
    1U of ``|x|``. That is (4.5t + 5)U per step, taken as (5t + 5)U of the running bound. A Yogi
    ``sign(v - Delta^2)`` that rounding flips is outside it (a near tie: not met by these data).
    """
    return (5 * t + 5) * U


def data(n: int = 300, steps: int = 5, seed: int = 0):
    """x0 and ``steps`` mean client deltas of ``n`` float32 entries: both signs, magnitudes from
    1e-5 to 0.3 (below and far above tau 1e-3), exact zeros (in x0, in some steps' deltas, and
    entries whose delta is always 0)."""
    gen = np.random.default_rng(seed)
    x0 = gen.normal(0, 1, n).astype(np.float32)
    x0[::7] = 0.0
    scale = 10.0 ** gen.uniform(-5, -0.5, n)
    deltas = [(gen.normal(0, 1, n) * scale).astype(np.float32) for _ in range(steps)]
    for t, d in enumerate(deltas):
        d[t::11] = 0.0
        d[::13] = 0.0  # never moved: x stays x0 exactly (and 0 where x0 is 0 too: entries 0, 91, 182, 273)
    return x0, deltas


def run(opt_or_cfg, x0, deltas, **kw):
    """x (float32 numpy) after each server step on the pseudo-gradients ``-deltas``."""
    w = torch.nn.Parameter(torch.tensor(x0))
    opt = build_server_optimizer([w], opt_or_cfg) if isinstance(opt_or_cfg, OptimizerConfig) else opt_or_cfg([w])
    out = []
    for d in deltas:
        w.grad = -torch.tensor(d)
        opt.step()
        out.append(w.detach().numpy().copy())
    return out


def server_cfg(**optimizer) -> OptimizerConfig:
    return validate_config({"server_config": {"optimizer_config": optimizer}}, "test").server_config.optimizer_config


def assert_follows_algorithm2(got, expected, what: str) -> float:
    """Each step's float32 x is within :func:`float32_bound` of the float64 transcription; returns
    the largest error in units of U times the bound (how much of the allowance was used)."""
    used = 0.0
    for t, (x32, (x64, bound)) in enumerate(zip(got, expected), start=1):
        err = np.abs(x32.astype(np.float64) - x64)
        assert np.all(err <= float32_bound(t) * bound), \
            f"{what} step {t}: max error {err.max():.3g} beyond {float32_bound(t) / U:.0f} U of the bound"
        used = max(used, float(np.divide(err, bound, out=np.zeros_like(err), where=bound > 0).max()) / U)
        assert np.all(x32[bound == 0] == 0)  # never moved and x0 = 0: exactly 0
    return used


# ---- Algorithm 2, the default --------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
def test_default_server_optimizer_is_algorithm_2(rule):
    """Five steps on 300 entries, with the paper's betas (0.9, 0.99) and tau 1e-3 (the server's
    defaults, left unset here) and lr 0.01."""
    cfg = server_cfg(type=rule, lr=0.01)
    assert (cfg.server_form, cfg.betas, cfg.eps) == ("fedopt", (0.9, 0.99), 1e-3)
    x0, deltas = data()
    got = run(cfg, x0, deltas)
    assert_follows_algorithm2(got, algorithm2(rule, x0, deltas, 0.01, (0.9, 0.99), 1e-3), rule)  # used: 2.5 to 2.9 U
    assert not np.array_equal(got[-1], x0)


@pytest.mark.parametrize("rule", RULES)
def test_other_hyper_parameters_follow_algorithm_2(rule):
    """Betas, tau and lr as set, and large deltas (v far above tau^2; Yogi's v shrinks where
    Delta^2 < v and grows elsewhere)."""
    x0, deltas = data(seed=1)
    deltas = [d * 30 for d in deltas]
    cfg = server_cfg(type=rule, lr=0.3, betas=[0.5, 0.9], eps=1e-2)
    assert_follows_algorithm2(run(cfg, x0, deltas), algorithm2(rule, x0, deltas, 0.3, (0.5, 0.9), 1e-2), rule)


def test_fedadam_first_step_on_a_scalar():
    """x = 0, mean delta 0.03, lr 0.01, betas (0.9, 0.99), tau 1e-3: m = 0.003,
    v = 0.99e-6 + 0.01 * 9e-4 = 9.99e-6, step 0.01 * 0.003 / (sqrt(9.99e-6) + 1e-3) = 0.0072103.
    torch's Adam (the server's optimizer before issue 23) steps 0.009677: bias correction and eps
    inside make its first step about lr * sign(Delta)."""
    x0, deltas = np.zeros(1, np.float32), [np.full(1, 0.03, np.float32)]
    d = float(deltas[0][0])  # 0.03 in float32
    expected = 0.01 * 0.1 * d / (np.sqrt(0.99e-6 + 0.01 * d ** 2) + 1e-3)
    assert expected == pytest.approx(0.0072103, abs=1e-7)
    assert algorithm2("adam", x0, deltas, 0.01, (0.9, 0.99), 1e-3)[0][0][0] == pytest.approx(expected, rel=1e-12)
    got = run(server_cfg(type="adam", lr=0.01), x0, deltas)[0][0]
    assert got == pytest.approx(expected, rel=8 * U)
    torch_adam = run(server_cfg(type="adam", lr=0.01, betas=[0.9, 0.99], eps=1e-3, server_form="torch"), x0, deltas)
    assert torch_adam[0][0] == pytest.approx(0.009677, abs=1e-6)


@pytest.mark.parametrize("rule,decoupled", [("adam", False), ("yogi", False), ("adagrad", False), ("adam", True)],
                         ids=["adam", "yogi", "adagrad", "adamw"])
def test_weight_decay(rule, decoupled):
    """``weight_decay`` is L2 (added to the pseudo-gradient) for adam/yogi/adagrad; type adamw is
    FedAdam with decoupled decay (x times 1 - lr wd before the step)."""
    x0, deltas = data(seed=2)
    cfg = server_cfg(type="adamw" if decoupled else rule, lr=0.05, weight_decay=0.1)
    got = run(cfg, x0, deltas)
    expected = algorithm2(rule, x0, deltas, 0.05, (0.9, 0.99), 1e-3, weight_decay=0.1, decoupled=decoupled)
    assert_follows_algorithm2(got, expected, f"{rule} weight decay")
    plain = algorithm2(rule, x0, deltas, 0.05, (0.9, 0.99), 1e-3)
    assert np.abs(plain[-1][0] - expected[-1][0]).max() > 1e-3  # the decay moved x


def test_adagrad_momentum_is_betas_0():
    """FedAdagrad has Algorithm 2's momentum m, with b1 = betas[0]; betas[1] is not used."""
    x0, deltas = data(seed=3)
    for betas in ([0.0, 0.5], [0.6, 0.99]):
        cfg = server_cfg(type="adagrad", lr=0.05, betas=betas)
        expected = algorithm2("adagrad", x0, deltas, 0.05, (betas[0], 0.0), 1e-3)
        assert_follows_algorithm2(run(cfg, x0, deltas), expected, f"adagrad betas {betas}")


# ---- server_form: torch ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                      ("adagrad", torch.optim.Adagrad)])
def test_torch_form_is_torch_exactly(kind, cls):
    """``server_form: torch`` builds torch's optimizer with torch's defaults (betas (0.9, 0.999),
    eps 1e-8, as before issue 23): bit-identical steps."""
    cfg = server_cfg(type=kind, lr=0.01, weight_decay=0.01, server_form="torch")
    assert (cfg.betas, cfg.eps) == ((0.9, 0.999), 1e-8)
    options = dict(lr=0.01, eps=1e-8, weight_decay=0.01)
    if kind != "adagrad":
        options["betas"] = (0.9, 0.999)
    x0, deltas = data(seed=4)
    got, ref = run(cfg, x0, deltas), run(lambda p: cls(p, **options), x0, deltas)
    assert isinstance(build_server_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg), cls)
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))


def test_client_optimizer_is_torch():
    """The client section keeps torch's optimizers and defaults; server_form there is an error."""
    cfg = validate_config({"client_config": {"optimizer_config": {"type": "adam", "lr": 0.01}}}, "t")
    opt = cfg.client_config.optimizer_config
    assert (opt.betas, opt.eps, opt.server_form) == ((0.9, 0.999), 1e-8, None)
    assert type(build_optimizer([torch.nn.Parameter(torch.zeros(1))], opt)) is torch.optim.Adam
    for form in ("torch", "fedopt"):
        with pytest.raises(UserError, match=r"^config t: client_config\.optimizer_config: server_form .* server "
                                            r"optimizer only") as err:
            validate_config({"client_config": {"optimizer_config": {"server_form": form}}}, "t")
        assert "\n" not in str(err.value)


def test_server_defaults_and_what_the_user_sets():
    """Under fedopt the adaptive types take the paper's betas and tau unless set; sgd is torch's SGD
    under either form; null means fedopt; a resolved config validates to itself."""
    assert server_cfg(type="adam", eps=1e-4).eps == 1e-4
    assert server_cfg(type="adagrad", betas=[0.0, 0.9]).betas == (0.0, 0.9)
    assert server_cfg(type="adamw").betas == (0.9, 0.99)
    assert server_cfg(type="yogi", server_form="torch").eps == 1e-3  # FedYogi either way
    assert server_cfg(type="adam", server_form=None).server_form == "fedopt"
    assert validate_config({}, "t").server_config.optimizer_config.server_form == "fedopt"
    for form in ("fedopt", "torch"):
        assert type(build_server_optimizer([torch.nn.Parameter(torch.zeros(1))], server_cfg(server_form=form))) \
               is torch.optim.SGD
    cfg = validate_config({"server_config": {"optimizer_config": {"type": "adam"}}}, "t")
    assert validate_config(cfg.to_dict(), "t") == cfg
    with pytest.raises(UserError, match=r"server_config\.optimizer_config\.server_form: Input should be 'fedopt' or "
                                        r"'torch' \(got 'paper'\)"):
        server_cfg(type="adam", server_form="paper")


def test_runs_made_before_server_form_resume_only_as_torch():
    """A resolved config stored before server_form existed, with an adam server, reads as
    server_form torch: resuming it under the new default is refused naming server_form (not
    betas), and adding server_form: torch alone matches it again."""
    old = validate_config({"server_config": {"optimizer_config": {"type": "adam", "lr": 0.01,
                                                                  "server_form": "torch"}}}, "t").to_dict()
    del old["server_config"]["optimizer_config"]["server_form"]
    del old["client_config"]["optimizer_config"]["server_form"]
    now = validate_config({"server_config": {"optimizer_config": {"type": "adam", "lr": 0.01}}}, "t").to_dict()
    assert config_difference(with_defaults(old), now) == \
        "server_config.optimizer_config.server_form: 'torch' there, 'fedopt' now"
    again = validate_config({"server_config": {"optimizer_config": {"type": "adam", "lr": 0.01,
                                                                    "server_form": "torch"}}}, "t").to_dict()
    assert config_difference(with_defaults(old), again) is None
    yogi = validate_config({"server_config": {"optimizer_config": {"type": "yogi"}}}, "t").to_dict()
    stored = copy.deepcopy(yogi)
    del stored["server_config"]["optimizer_config"]["server_form"]
    assert config_difference(with_defaults(stored), yogi) is None  # FedYogi did not change


# ---- state across a checkpoint ----------------------------------------------------------------------

def _checkpoint_round_trip(opt, tmp_path) -> dict:
    """The optimizer's state dict after save_atomic and load_checkpoint (checksum and structure
    checks of core/checkpoint.py), inside a minimal checkpoint."""
    state = {"round": 2, "global": torch.zeros(3), "server_optimizer": opt.state_dict(),
             "client_store": {"entries": {}}, "strategy_state": torch.zeros(0), "history": [], "elapsed_s": 1.0,
             "config": {}, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                   "python": random.getstate()}}
    save_atomic(state, tmp_path / "latest.pt")
    return load_checkpoint(tmp_path / "latest.pt")["server_optimizer"]


@pytest.mark.parametrize("kind", ["adam", "adamw", "yogi", "adagrad"])
def test_state_survives_a_checkpoint_mid_sequence(kind, tmp_path):
    """Two steps, a checkpoint of the state dict, a new optimizer on a new parameter holding the
    weights, three more steps: bit-identical to five uninterrupted steps."""
    x0, deltas = data(seed=5)
    cfg = server_cfg(type=kind, lr=0.02, weight_decay=0.01)
    straight = run(cfg, x0, deltas)
    w = torch.nn.Parameter(torch.tensor(x0))
    opt = build_server_optimizer([w], cfg)
    for d in deltas[:2]:
        w.grad = -torch.tensor(d)
        opt.step()
    saved = _checkpoint_round_trip(opt, tmp_path)
    assert set(saved["state"][0]) == {"m", "v"}
    w2 = torch.nn.Parameter(w.detach().clone())
    resumed = build_server_optimizer([w2], cfg)
    resumed.load_state_dict(saved)
    for t, d in enumerate(deltas[2:], start=2):
        w2.grad = -torch.tensor(d)
        resumed.step()
        assert np.array_equal(w2.detach().numpy(), straight[t]), f"step {t + 1}"


def test_torch_state_is_refused_by_the_fedopt_form():
    """A torch Adam state (a run of server_form torch) loaded into FedOpt: one line naming the fix."""
    w = torch.nn.Parameter(torch.zeros(4))
    adam = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(4)
    adam.step()
    fed = FedOpt([torch.nn.Parameter(torch.zeros(4))], lr=0.1, rule="adam")
    with pytest.raises(UserError, match="server_form: torch"):
        fed.load_state_dict(copy.deepcopy(adam.state_dict()))
    buffer = io.BytesIO()
    torch.save(fed.state_dict(), buffer)  # an unstepped FedOpt state is empty and loads anywhere
    buffer.seek(0)
    fed.load_state_dict(torch.load(buffer, weights_only=True))


# ---- end to end: the real server step ---------------------------------------------------------------

@pytest.mark.skipif("build_server_optimizer" not in vars(core.server),
                    reason="core/server.py does not build its optimizer with build_server_optimizer yet")
@pytest.mark.parametrize("rule", RULES)
def test_server_rounds_follow_algorithm_2(rule, tmp_path):
    """Three rounds of the synthetic task through Server._round: the global parameters follow
    Algorithm 2 on the pseudo-gradients the server computed; personal layers stay as they were."""
    from core.distributed import DistContext, Transport
    from core.simulation import build_simulation
    from core.task import load_task

    cfg = validate_config({"model_config": {"model_type": "MLP"},
                           "server_config": {"max_iteration": 3, "num_clients_per_iteration": 5,
                                             "optimizer_config": {"type": rule, "lr": 0.03}},
                           "client_config": {"batch_size": 16, "augment": False,
                                             "optimizer_config": {"type": "sgd", "lr": 0.1}},
                           "data_config": {"num_clients": 20, "partition": "dirichlet", "alpha": 0.5},
                           "personalization": {"method": "fedper", "local_layers": ["linear"]},
                           "device": "cpu"}, "test")
    ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
    sim = build_simulation(cfg, load_task("synthetic"), "unused", ctx, Transport(ctx))
    server = core.server.Server(sim, tmp_path, None)
    assert isinstance(server.optimizer, FedOpt) and server.optimizer.rule == rule
    pseudo, compute = [], sim.strategy.pseudo_gradient
    sim.strategy.pseudo_gradient = lambda d, w, s: pseudo.append(compute(d, w, s)) or pseudo[-1]
    k = sim.layout.num_params
    x0 = server.global_flat[:k].numpy().copy()
    got = []
    for r in (1, 2, 3):
        server._round(r)
        got.append(server.global_flat[:k].numpy().copy())
    server.close()
    deltas = [-p[:k].numpy() for p in pseudo]  # personal positions zeroed by the server before its step
    assert_follows_algorithm2(got, algorithm2(rule, x0, deltas, 0.03, (0.9, 0.99), 1e-3), f"server {rule}")
    personal = sim.personal_index[sim.personal_index < k].numpy()
    assert np.array_equal(got[-1][personal], x0[personal]) and not np.array_equal(got[-1], x0)
