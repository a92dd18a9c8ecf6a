"""Adaptive clipping (privacy.mechanism: adaptive_gaussian, Andrew et al. 2021, arXiv:1905.03871) and
local DP (privacy.mechanism: local_gaussian), issue 25: each checked against a float64 transcription
of its definition or an exact closed form, not against the code's own arithmetic.
"""
from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch

from core.cohort import sample_cohort
from core.errors import UserError
from core.exact import decode
from core.privacy import AdaptiveClip, CentralDp, local_epsilon, mechanism_of
from core.seeding import derive_seed
from core.server import Server
from core.worker import RoundLayout
from testing.conftest import load_ckpt, read_metrics
from testing.test_dp import _fixed_sum, _launched, _sim, _trainer, SYNTHETIC
from testing.test_exact_sum import assert_bit_identical

# noise multiplier 0.3: below twice the default count noise of a 5-client cohort (5 / 20)
ADAPTIVE = ["privacy.mechanism=adaptive_gaussian", "privacy.clip_norm=0.05", "privacy.noise_multiplier=0.3"]
LOCAL = ["privacy.mechanism=local_gaussian", "privacy.noise_multiplier=0.5"]


def _mechanism(m: int, count_stddev: float, gamma: float = 0.5, lr: float = 0.2, z: float = 1.0) -> CentralDp:
    return CentralDp(clip_norm=0.1, noise_multiplier=z, expected_cohort=m, noise_cohort=m, population=100 * m,
                     delta=1e-6, accountant="rdp", adaptive=AdaptiveClip(gamma, lr, count_stddev))


# ---- adaptive clipping -----------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.5, 0.8])
def test_adaptive_clipping_converges_to_the_target_quantile_of_synthetic_norms(gamma):
    """Update norms log-normal(0, 1) (their gamma-quantile is exp(Phi^-1(gamma))), 1,000 clients a
    round, the paper's count noise m / 20: from a clip norm 10x too small, the clip norm settles at
    the quantile and the share of unclipped updates at gamma."""
    dp = _mechanism(1000, 1000 / 20, gamma)
    rng = np.random.default_rng(0)
    clip, logs, shares = 0.1, [], []
    for r in range(1, 601):
        norms = rng.lognormal(0.0, 1.0, 1000)
        unclipped = int((norms <= clip).sum())
        shares.append(unclipped / 1000)
        clip = dp.adaptive.next_clip_norm(clip, unclipped, 1000, dp, seed=3, round_idx=r)
        logs.append(math.log(clip))
    quantile = math.exp(math.sqrt(2) * torch.erfinv(torch.tensor(2 * gamma - 1, dtype=torch.float64)).item())
    settled = float(np.mean(logs[300:]))
    print(f"gamma {gamma}: clip {math.exp(settled):.4f} vs quantile {quantile:.4f}, share {np.mean(shares[300:]):.4f}")
    assert abs(settled - math.log(quantile)) < 0.05
    assert abs(float(np.mean(shares[300:])) - gamma) < 0.02
    assert math.log(0.1) < logs[0] < logs[20], "it climbs from a clip norm that is too small"


def test_the_update_and_count_noise_together_are_the_configured_multiplier():
    """Theorem 1 of Andrew et al.: noise z_update on the clipped sum (sensitivity C) and sigma_b on
    the sum of indicators minus 1/2 (sensitivity 1/2) are one Gaussian mechanism of multiplier z with
    z^-2 = z_update^-2 + (2 sigma_b)^-2."""
    dp = _mechanism(50, 2.5, z=1.3)
    z_update = dp.update_noise_multiplier
    assert z_update > 1.3
    assert z_update ** -2 + (2 * 2.5) ** -2 == pytest.approx(1.3 ** -2, rel=1e-12)
    assert dp.noise_std(0.7) == pytest.approx(z_update * 0.7, rel=1e-12)
    with pytest.raises(UserError, match="privacy.clipped_count_stddev 0.6: must be above half the noise multiplier"):
        _mechanism(50, 0.6, z=1.3)


def test_a_runs_clip_norms_follow_the_papers_geometric_update(tmp_path):
    """Evaluated every round: the clip norm of round t+1 is, in float64 then rounded to float32,
    C_t * exp(-eta * (b_t - gamma)), b_t = (sum_i (1[||delta_i|| <= C_t] - 1/2) + N(0, sigma_b^2)) / m
    + 1/2 over the summed clients (m the expected cohort, sigma_b = m / 20 by default), its noise drawn
    from (seed, round)."""
    assert _trainer(tmp_path, "a", *ADAPTIVE, "server_config.max_iteration=8", "server_config.val_freq=1",
                    "privacy.target_unclipped_quantile=0.3", "privacy.clip_learning_rate=0.5") == 0
    records = read_metrics(tmp_path / "a")
    m, sigma_b, gamma, eta = 5, 5 / 20, 0.3, 0.5
    clip = float(np.float32(0.05))
    assert records[0]["privacy"]["clip_norm"] == clip and records[0]["privacy"]["mechanism"] == "adaptive_gaussian"
    sim = _sim(*ADAPTIVE)
    for record, after in zip(records, records[1:]):
        r, dp = record["round"], record["privacy"]
        assert dp["clip_norm"] == clip
        summed = len(sim.schedule.cohort(r))
        unclipped = summed - round((dp["clipped_share"] or 0.0) * summed)
        generator = torch.Generator().manual_seed(derive_seed(0, r, 0xDA, 0, 0xDA))
        noise = float(torch.randn(1, generator=generator, dtype=torch.float32)[0]) * sigma_b
        b = (unclipped - summed / 2 + noise) / m + 0.5
        clip = float(np.float32(clip * math.exp(-eta * (b - gamma))))
        assert after["privacy"]["clip_norm"] == clip, r
    assert len({rec["privacy"]["clip_norm"] for rec in records}) > 4, "the clip norm moves"
    assert records[-1]["privacy"]["epsilon"] == mechanism_of(sim.cfg, sim.schedule).epsilon(8)


def test_adaptive_clip_norm_and_model_survive_a_resume_exactly(tmp_path):
    sets = [*ADAPTIVE, "server_config.ckpt_freq=2", "server_config.val_freq=2"]
    assert _trainer(tmp_path, "straight", *sets, "server_config.max_iteration=6") == 0
    assert _trainer(tmp_path, "half", *sets, "server_config.max_iteration=2") == 0
    assert _trainer(tmp_path, "half", *sets, "server_config.max_iteration=6", extra=["-resume"]) == 0
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "half")
    assert torch.equal(a["global"], b["global"]) and a["privacy"] == b["privacy"]
    assert [r["privacy"] for r in read_metrics(tmp_path / "straight")] == \
           [r["privacy"] for r in read_metrics(tmp_path / "half")]


def test_a_count_noise_below_half_the_multiplier_stops_the_run_with_one_line(tmp_path, capsys):
    code = _trainer(tmp_path, "c", *ADAPTIVE, "privacy.noise_multiplier=1.0", "privacy.clipped_count_stddev=0.4")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "privacy.clipped_count_stddev 0.4" in lines[0], lines
    assert not (tmp_path / "c" / "checkpoints").exists() or not any((tmp_path / "c" / "checkpoints").iterdir())


# ---- local DP ---------------------------------------------------------------------------------------

def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon at ``delta`` of a Gaussian mechanism with sensitivity / std = ``mu`` (Balle &
    Wang 2018, Theorem 8): delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu); bisection."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    spent = lambda eps: phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu)  # noqa: E731
    low, high = 0.0, 500.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize("z, releases", [(2.0, 1), (4.0, 10), (8.0, 30)])
def test_local_epsilon_is_the_exact_gaussian_of_a_2c_sensitivity(z, releases):
    """A client's releases are Gaussians of std z C on updates that differ by at most 2 C: together
    one Gaussian of mu = 2 sqrt(releases) / z (Gaussians compose exactly). PLD lands within 1% above
    the exact epsilon, RDP above it."""
    exact = _exact_gaussian_epsilon(2 * math.sqrt(releases) / z, 1e-5)
    pld = local_epsilon(z, releases, 1e-5, "pld")
    rdp = local_epsilon(z, releases, 1e-5, "rdp")
    print(f"z {z} x{releases}: exact {exact:.5f}, pld {pld:.5f}, rdp {rdp:.5f}")
    assert exact * (1 - 1e-6) <= pld <= exact * 1.01
    assert rdp >= exact
    assert local_epsilon(z, 0, 1e-5) == 0.0 and local_epsilon(0.0, 3, 1e-5) == math.inf


@pytest.mark.parametrize("vectorize", [False, True])
def test_a_local_clients_term_is_its_update_clipped_to_c(vectorize):
    """One client of the round: its term of the sum is its raw update scaled to norm C, zero at the
    personal head (the noise is the server's: below)."""
    sets = ["privacy.clip_norm=0.05", "client_config.optimizer_config.lr=2.0",
            f"client_config.vectorize={str(vectorize).lower()}"]
    local, free = _sim(*LOCAL, *sets), _sim(*sets, "privacy.clip_norm=1e6", "privacy.noise_multiplier=0")
    start = local.layout.flatten().clone()
    C = 0.05
    for cid in (3, 11):
        lay, out = _fixed_sum(local, start, [cid])
        term = decode(lay.exact_parts(out)[0])  # one client: share 1
        free_lay, free_out = _fixed_sum(free, start, [cid])
        raw = decode(free_lay.exact_parts(free_out)[0]) * 5
        assert lay.clipped(out).tolist() == [1.0] and float(raw.norm()) > 20 * C
        assert torch.allclose(term, raw * (C / raw.norm()), atol=1e-9, rtol=0), float((term - raw * C / raw.norm()).abs().max())
        assert float(term[local.personal_index].abs().max()) == 0.0, "the head never leaves the client"


@pytest.mark.parametrize("dropped", [0, 1])
def test_a_local_round_carries_the_mean_of_the_kept_clients_noises(tmp_path, dropped):
    """30 rounds whose clipped updates are zero, ``dropped`` of the 5 clients dropped: the server's SGD
    (lr 1) steps the shared parameters by the mean of the K kept clients' noises, N(0, (z C)^2) each,
    independent: std z C / sqrt(K) per coordinate (measured against the closed form); the personal
    head does not move."""
    sim = _sim(*LOCAL, "privacy.noise_multiplier=2.0", "privacy.clip_norm=0.3")
    server = Server(sim, tmp_path, None)
    steps = []
    for r in range(1, 31):
        lay = RoundLayout(sim, r)
        assert len(set(lay.weights.tolist())) == 1, "uniform weights"
        server.fill_round(r, lay)
        before = server.global_flat.clone()
        total = lay.new_reduce_buffer(torch.device("cpu"))
        lay.reduce.views(total)["dropped"][:dropped] = 1.0
        server._aggregate(r, lay, total)
        steps.append(server.global_flat - before)
    step = torch.stack(steps)
    personal = torch.zeros(sim.layout.numel, dtype=torch.bool)
    personal[sim.personal_index] = True
    assert float(step[:, personal].abs().max()) == 0.0
    expected, measured = 2.0 * 0.3 / math.sqrt(5 - dropped), float(step[:, ~personal].double().std())
    print(f"{5 - dropped} kept: measured std {measured:.6f}, expected {expected:.6f}")
    assert measured == pytest.approx(expected, rel=0.03)
    server.close()


def test_local_run_reports_the_epsilon_of_the_busiest_client(tmp_path):
    assert _trainer(tmp_path, "l", *LOCAL, "server_config.max_iteration=6", "server_config.val_freq=3",
                    "privacy.accountant=pld") == 0
    records = read_metrics(tmp_path / "l")
    counts = np.zeros(20, dtype=int)
    most = {}
    for r in range(1, 7):  # fixed cohorts of 5 (no Poisson sampling under local DP)
        counts[sample_cohort(0, r, 20, 5)] += 1
        most[r] = int(counts.max())
    for record in records:
        dp = record["privacy"]
        assert dp["mechanism"] == "local_gaussian" and dp["releases"] == most[record["round"]]
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.25), most[record["round"]])
        assert dp["epsilon"] == dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(1e-6)
    summary = (tmp_path / "l" / "summary.md").read_text()
    assert "Local DP: epsilon" in summary and f"({most[6]})" in summary


def test_local_target_epsilon_is_calibrated_for_the_busiest_client(tmp_path):
    assert _trainer(tmp_path, "t", "privacy.mechanism=local_gaussian", "privacy.noise_multiplier=null",
                    "privacy.target_epsilon=20", "server_config.max_iteration=4", "server_config.val_freq=4") == 0
    dp = read_metrics(tmp_path / "t")[-1]["privacy"]
    assert 19.5 < dp["epsilon"] <= 20.0
    assert dp["epsilon"] == local_epsilon(dp["noise_multiplier"], dp["releases"], 1e-6, "rdp")


def test_local_resume_is_exact(tmp_path):
    sets = [*LOCAL, "server_config.ckpt_freq=2", "server_config.val_freq=2"]
    assert _trainer(tmp_path, "straight", *sets, "server_config.max_iteration=4") == 0
    assert _trainer(tmp_path, "half", *sets, "server_config.max_iteration=2") == 0
    assert _trainer(tmp_path, "half", *sets, "server_config.max_iteration=4", extra=["-resume"]) == 0
    assert torch.equal(load_ckpt(tmp_path / "straight")["global"], load_ckpt(tmp_path / "half")["global"])
    assert [r["privacy"] for r in read_metrics(tmp_path / "straight")] == \
           [r["privacy"] for r in read_metrics(tmp_path / "half")]


@pytest.mark.parametrize("mechanism", [ADAPTIVE, LOCAL])
def test_one_and_three_processes_agree_bit_for_bit(tmp_path, mechanism):
    base = ["privacy.clip_norm=0.5", "privacy.noise_multiplier=1.0", "strategy_config.client_weighting=uniform"]
    sets = [*base, *mechanism, "server_config.max_iteration=4", "server_config.val_freq=2"]
    args = SYNTHETIC + [a for item in sets for a in ("--set", item)]
    (one, first), (three, second) = _launched(tmp_path, 1, args), _launched(tmp_path, 3, args)
    assert_bit_identical(one, three)
    assert [r["privacy"] for r in first] == [r["privacy"] for r in second]


def test_a_delta_not_below_one_over_population_runs_and_says_so(tmp_path, capsys):
    assert _trainer(tmp_path, "d", "privacy.delta=0.1", "server_config.max_iteration=2") == 0
    err = capsys.readouterr().err
    assert "pfedsim: warning: privacy.delta 0.1 is not below 1 / population (1/20)" in err
    assert "Delta 0.1 is not below 1 / population (1/20)" in (tmp_path / "d" / "summary.md").read_text()
