"""Central client-level DP in runs (DP-FedAvg, McMahan et al. 2018, arXiv:1710.06963; issue 25):
each client's update is clipped before it enters the sum, the server's noise has the configured
std and is the same bits for any number of processes, a resume reports what an uninterrupted run
does, the epsilon is the accountant's, cohorts are Poisson-sampled, and bad configs are one line.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import e2e_trainer
from core.cohort import sample_cohort
from core.config import load_config
from core.distributed import DistContext, Transport
from core.errors import UserError
from core.exact import decode
from core.messages import GO
from core.privacy import CentralDp, DpSchedule, calibrate_noise, epsilon
from core.schedule import Schedule
from core.server import Server
from core.simulation import build_simulation
from core.task import load_task
from core.worker import RoundLayout, train_share
from testing.conftest import REPO, failure_text, load_ckpt, read_metrics, run_trainer
from testing.test_exact_sum import assert_bit_identical

CONFIG = REPO / "experiments" / "synthetic" / "config.yaml"  # 20 clients, cohort 5, MLP, FedPer head
DP = ["privacy.mechanism=gaussian", "privacy.clip_norm=0.5", "privacy.noise_multiplier=1.0",
      "strategy_config.client_weighting=uniform"]
SYNTHETIC = ["-dataPath", "unused", "-config", str(CONFIG), "-task", "synthetic"]


def _sim(*overrides: str):
    """A one-process synthetic simulation on the CPU with DP and ``overrides``."""
    cfg = load_config(CONFIG, [*DP, "device=cpu", *overrides])
    ctx = DistContext(0, 1, torch.device("cpu"), "gloo")
    return build_simulation(cfg, load_task("synthetic"), None, ctx, Transport(ctx))


def _trainer(tmp_path, name: str, *overrides: str, extra=()) -> int:
    """e2e_trainer in this process (one rank), the synthetic task with DP and ``overrides``."""
    sets = [a for item in [*DP, *overrides] for a in ("--set", item)]
    return e2e_trainer.main(SYNTHETIC + ["-outputPath", str(tmp_path), "-run_name", name, *sets, *extra])


# ---- clipping -------------------------------------------------------------------------------------

def _fixed_sum(sim, start: torch.Tensor, clients: list[int]):
    """The round-1 reduce buffer of a cohort forced to ``clients`` (the layout and the buffer)."""
    sim.schedule.cohort = lambda r: np.array(clients, dtype=np.int64)
    lay = RoundLayout(sim, 1)
    buf = lay.broadcast.build(torch.device("cpu"), {"global": start, "server_state": torch.zeros(0),
                                                    "slots": [start[sim.personal_index]] * len(clients),
                                                    "control": GO})
    return lay, train_share(sim, 1, buf, lay)


@pytest.mark.parametrize("vectorize", [False, True])
def test_clipping_bounds_each_clients_contribution_to_the_sum(vectorize):
    """With a large client lr every update is far beyond the clip norm: each client's term of the
    fixed-point sum is its unclipped update scaled to norm C (to the sum's resolution), zero at the
    personal head, flagged as clipped, and the sum of two clients is the sum of their terms (a fixed
    denominator E: a client's term does not depend on who else is in the cohort)."""
    sets = ["privacy.clip_norm=0.05", "privacy.noise_multiplier=0", "client_config.optimizer_config.lr=2.0",
            f"client_config.vectorize={str(vectorize).lower()}"]
    clipped, free = _sim(*sets), _sim(*sets, "privacy.clip_norm=1e6")
    start = clipped.layout.flatten().clone()
    E, C = 5, 0.05
    terms, raws = {}, {}
    for cid in (3, 11):
        lay, out = _fixed_sum(clipped, start, [cid])
        terms[cid] = lay.exact_parts(out)[0].clone()
        assert lay.clipped(out).tolist() == [1.0] and lay.dropped(out).tolist() == [0.0]
        free_lay, free_out = _fixed_sum(free, start, [cid])
        assert free_lay.clipped(free_out).tolist() == [0.0]
        raws[cid] = decode(free_lay.exact_parts(free_out)[0]) * E
    lay, both = _fixed_sum(clipped, start, [3, 11])
    pair, alone = lay.exact_parts(both)[0], terms[3] + terms[11]
    if vectorize:  # a vmap group of two rounds its training arithmetic otherwise than two groups of one
        gap = float((decode(pair) - decode(alone)).norm() / decode(alone).norm())
        assert gap < 1e-3, gap
    else:
        assert torch.equal(pair, alone), "each client's term is its own"
    for cid, term in terms.items():
        contribution, raw = decode(term) * E, raws[cid]
        assert float(raw.norm()) > 20 * C, "the update is far beyond the clip norm"
        assert float(contribution.norm()) <= C * (1 + 1e-9)
        assert torch.allclose(contribution, raw * (C / raw.norm()), atol=1e-10, rtol=0)
        assert float(contribution[clipped.personal_index].abs().max()) == 0.0, "the head never leaves the client"
    delta_sum = lay.reduce_parts(both)[0]
    assert float(delta_sum.norm()) <= 2 * C * (1 + 1e-9)


# ---- noise ----------------------------------------------------------------------------------------

def test_the_noise_function_has_the_configured_std_and_is_a_function_of_the_round():
    dp = CentralDp(clip_norm=0.5, noise_multiplier=1.3, expected_cohort=5, noise_cohort=20, population=400,
                   delta=1e-6, accountant="rdp")
    assert dp.noise_std() == pytest.approx(1.3 * 0.5 * 5 / 20)
    draws = torch.stack([dp.noise(7, r, 20_000) for r in range(1, 41)])  # 800,000 draws
    assert float(draws.std()) == pytest.approx(dp.noise_std(), rel=0.01)
    assert abs(float(draws.mean())) < 5 * dp.noise_std() / math.sqrt(draws.numel())
    assert torch.equal(dp.noise(7, 3, 100), dp.noise(7, 3, 100))
    assert not torch.equal(dp.noise(7, 3, 100), dp.noise(7, 4, 100))
    assert not torch.equal(dp.noise(7, 3, 100), dp.noise(8, 3, 100))


def test_a_zero_update_moves_the_global_model_by_noise_of_std_z_c_over_e(tmp_path):
    """30 rounds whose reduced sums are zero (no client moved): the server's SGD (lr 1) steps the
    shared parameters by noise / E, std z * C / E per coordinate; the personal head does not move."""
    sim = _sim("privacy.noise_multiplier=2.0", "privacy.clip_norm=0.3")
    server = Server(sim, tmp_path, None)
    steps = []
    for r in range(1, 31):
        lay = RoundLayout(sim, r)
        server.fill_round(r, lay)
        before = server.global_flat.clone()
        server._aggregate(r, lay, lay.new_reduce_buffer(torch.device("cpu")))
        steps.append(server.global_flat - before)
    step = torch.stack(steps)
    personal = torch.zeros(sim.layout.numel, dtype=torch.bool)
    personal[sim.personal_index] = True
    assert float(step[:, personal].abs().max()) == 0.0
    shared = step[:, ~personal].double()
    expected = 2.0 * 0.3 / 5
    measured = float(shared.std())
    print(f"measured std {measured:.6f}, expected {expected:.6f} ({shared.numel()} coordinates x rounds)")
    assert measured == pytest.approx(expected, rel=0.03)
    server.close()


# ---- processes, resume --------------------------------------------------------------------------------

def _launched(tmp_path, nproc: int, args: list[str]) -> tuple[dict, list[dict]]:
    """A run of ``nproc`` processes (gloo beyond one): its last checkpoint and its records."""
    backend = ["-backend", "gloo"] if nproc > 1 else []
    proc = run_trainer(args + ["-outputPath", str(tmp_path), "-run_name", f"p{nproc}", *backend], nproc=nproc)
    assert proc.returncode == 0, failure_text(proc)
    return load_ckpt(tmp_path / f"p{nproc}"), read_metrics(tmp_path / f"p{nproc}")


def test_one_and_three_processes_give_the_same_noise_and_model(tmp_path):
    args = SYNTHETIC + ["--set", "server_config.max_iteration=6", "--set", "server_config.val_freq=3"] \
        + [a for item in DP for a in ("--set", item)]
    (one, first), (three, second) = _launched(tmp_path, 1, args), _launched(tmp_path, 3, args)
    assert one["round"] == 6
    assert_bit_identical(one, three)
    records = [first, second]
    assert [r["privacy"] for r in records[0]] == [r["privacy"] for r in records[1]]
    assert [r["train_loss"] for r in records[0]] == [r["train_loss"] for r in records[1]]


def test_resume_is_exact_model_and_epsilon(tmp_path):
    sets = ["server_config.ckpt_freq=2", "server_config.val_freq=2"]
    assert _trainer(tmp_path, "straight", *sets, "server_config.max_iteration=4") == 0
    assert _trainer(tmp_path, "half", *sets, "server_config.max_iteration=2") == 0
    assert _trainer(tmp_path, "half", *sets, "server_config.max_iteration=4", extra=["-resume"]) == 0
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "half")
    assert b["round"] == 4 and torch.equal(a["global"], b["global"])
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "half")
    assert [r["round"] for r in resumed] == [2, 4]
    assert [r["privacy"] for r in straight] == [r["privacy"] for r in resumed]
    assert resumed[-1]["privacy"]["epsilon"] > resumed[0]["privacy"]["epsilon"] > 0


def test_a_resume_to_other_rounds_than_the_calibration_is_refused(tmp_path, capsys):
    """The noise calibrated to target_epsilon for 2 rounds would overspend over 4: one line."""
    sets = ["privacy.noise_multiplier=null", "privacy.target_epsilon=4.0", "server_config.ckpt_freq=1"]
    assert _trainer(tmp_path, "t", *sets, "server_config.max_iteration=2") == 0
    capsys.readouterr()
    assert _trainer(tmp_path, "t", *sets, "server_config.max_iteration=4", extra=["-resume"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "privacy.target_epsilon: this run calibrated its noise multiplier" in lines[0], lines
    assert "keep server_config.max_iteration: 2" in lines[0]


# ---- accounting -----------------------------------------------------------------------------------

def test_reported_epsilon_is_the_rdp_accountants_for_the_simulated_cohort(tmp_path):
    """noise_cohort_size 10 of a population of 40: sampling rate 0.25, whatever the simulated cohort."""
    assert _trainer(tmp_path, "r", "server_config.max_iteration=4", "server_config.val_freq=2",
                    "privacy.noise_cohort_size=10", "privacy.population=40", "privacy.delta=1e-4") == 0
    records = read_metrics(tmp_path / "r")
    for record in records:
        dp = record["privacy"]
        assert dp["sampling_rate"] == 0.25 and dp["accountant"] == "rdp" and dp["noise_multiplier"] == 1.0
        assert dp["epsilon"] == epsilon(DpSchedule(1.0, 0.25, record["round"]), 1e-4, "rdp")
        assert 0 <= dp["clipped_share"] <= 1
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert f"epsilon {records[-1]['privacy']['epsilon']:.3g} at delta 0.0001 after 4 rounds" in summary


def test_target_epsilon_is_calibrated_and_reached_under_pld(tmp_path):
    assert _trainer(tmp_path, "t", "server_config.max_iteration=4", "server_config.val_freq=2",
                    "privacy.noise_multiplier=null", "privacy.target_epsilon=3.0", "privacy.accountant=pld") == 0
    records = read_metrics(tmp_path / "t")
    z = calibrate_noise(3.0, 1e-6, 5 / 20, 4, "pld")
    for record in records:
        assert record["privacy"]["noise_multiplier"] == z
        assert record["privacy"]["epsilon"] == epsilon(DpSchedule(z, 0.25, record["round"]), 1e-6, "pld")
    assert 2.9 < records[-1]["privacy"]["epsilon"] <= 3.0


# ---- Poisson cohorts --------------------------------------------------------------------------------

def test_poisson_cohort_sizes_average_the_expected_cohort_and_are_seeded():
    cfg = load_config(CONFIG, DP)
    schedule = Schedule(cfg.server_config, 20, seed=4, poisson=True)
    sizes = np.array([len(schedule.cohort(r)) for r in range(1, 4001)])
    q = 5 / 20
    assert abs(sizes.mean() - 5) < 4 * math.sqrt(20 * q * (1 - q) / len(sizes))
    assert sizes.var() == pytest.approx(20 * q * (1 - q), rel=0.1), "Binomial(20, 1/4)"
    assert (sizes == 0).any() and len(set(sizes.tolist())) > 5
    again = Schedule(cfg.server_config, 20, seed=4, poisson=True)
    assert all(np.array_equal(schedule.cohort(r), again.cohort(r)) for r in range(1, 200))
    joins = np.bincount(np.concatenate([schedule.cohort(r) for r in range(1, 4001)]), minlength=20) / 4000
    assert np.abs(joins - q).max() < 0.03, "every client joins with probability q"
    fixed = Schedule(cfg.server_config, 20, seed=4)  # without DP: the fixed-size cohort as before
    assert all(np.array_equal(fixed.cohort(r), sample_cohort(4, r, 20, 5)) for r in range(1, 50))


def test_an_empty_cohort_round_moves_the_model_by_the_noise_alone(tmp_path):
    sim = _sim("server_config.num_clients_per_iteration=1")
    empty = next(r for r in range(1, 100) if len(sim.schedule.cohort(r)) == 0)
    server = Server(sim, tmp_path, None)
    before = server.global_flat.clone()
    loss, dropped = server._round(empty)
    assert math.isnan(loss) and dropped == 0
    noise = server.dp.noise(sim.cfg.seed, empty, sim.layout.numel)
    noise[sim.personal_index] = 0.0
    assert torch.allclose(server.global_flat - before, noise.float() / 1, atol=1e-6, rtol=0)
    assert server.clip_counts == [[0, 0]]
    server.close()


def test_a_run_with_empty_cohorts_finishes(tmp_path):
    sim = _sim("server_config.num_clients_per_iteration=1")
    assert any(len(sim.schedule.cohort(r)) == 0 for r in range(1, 11))
    assert _trainer(tmp_path, "e", "server_config.num_clients_per_iteration=1") == 0
    records = read_metrics(tmp_path / "e")
    assert records[-1]["round"] == 10 and records[-1]["privacy"]["epsilon"] > 0


# ---- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["privacy.mechanism=none"], "privacy.clip_norm is set but privacy.mechanism is none"),
    (["privacy.clip_norm=null"], "privacy.clip_norm: required with privacy.mechanism gaussian"),
    (["privacy.clip_norm=0"], "privacy.clip_norm: Input should be greater than 0"),
    (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier: Input should be greater than or equal to 0"),
    (["privacy.target_epsilon=2"], "set exactly one of them"),
    (["privacy.noise_multiplier=null"], "set exactly one of them"),
    (["strategy_config.client_weighting=samples"], "strategy_config.client_weighting samples"),
    (["strategy=scaffold"], "strategy scaffold cannot run under privacy.mechanism gaussian: its control variates"),
    (["strategy=dga"], "strategy dga cannot run under privacy.mechanism gaussian: its client weights"),
    (["strategy=feddyn"], "strategy feddyn cannot run under privacy.mechanism gaussian: its server state"),
    (["server_config.num_clients_per_iteration='2,6'"], "server_config.num_clients_per_iteration '2,6'"),
    (["privacy.population=10"], "privacy.population 10 is below data_config.num_clients (20)"),
    (["privacy.noise_cohort_size=2"], "privacy.noise_cohort_size 2: must be at least the cohort"),
    (["privacy.noise_cohort_size=30"], "privacy.noise_cohort_size 30: must be at least the cohort"),
    (["privacy.target_unclipped_quantile=0.3"], "privacy.target_unclipped_quantile: not read under privacy.mechanism "
                                                "gaussian"),
    (["privacy.mechanism=local_gaussian", "privacy.population=100"], "privacy.population: not read under "
                                                                     "privacy.mechanism local_gaussian"),
    (["privacy.mechanism=local_gaussian", "strategy=scaffold"], "strategy scaffold cannot run under privacy.mechanism "
                                                                "local_gaussian"),
    (["privacy.mechanism=local_gaussian", "strategy_config.client_weighting=samples"],
     "under privacy.mechanism local_gaussian a client's weight must not depend on its data"),
    (["privacy.mechanism=adaptive_gaussian", "privacy.target_unclipped_quantile=1.0"],
     "privacy.target_unclipped_quantile: Input should be less than 1"),
    (["privacy.mechanism=adaptive_gaussian", "privacy.clip_learning_rate=0"],
     "privacy.clip_learning_rate: Input should be greater than 0"),
    (["privacy.accountant=moments"], "privacy.accountant: Input should be 'rdp' or 'pld'"),
    (["privacy.mechanism=laplace"], "privacy.mechanism: Input should be 'none', 'gaussian', 'adaptive_gaussian' or 'local_gaussian'"),
])
def test_bad_privacy_configs_are_one_line_naming_the_field(overrides, words):
    with pytest.raises(UserError) as caught:
        load_config(CONFIG, DP + overrides)
    message = str(caught.value)
    assert words in message and "\n" not in message, message


def test_bad_config_and_shared_buffers_stop_the_trainer_with_one_line(tmp_path, capsys):
    assert _trainer(tmp_path, "w", "strategy_config.client_weighting=samples") == 2
    faulty = ["-task", str(REPO / "testing" / "tasks" / "faulty_task")]
    code = e2e_trainer.main(["-dataPath", "unused", "-config", str(CONFIG), "-outputPath", str(tmp_path), "-run_name",
                             "bn", *faulty, "--set", "model_config.model_type=BatchNormMLP"]
                            + [a for item in DP for a in ("--set", item)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 2, lines
    assert "strategy_config.client_weighting samples" in lines[0]
    assert "privacy.mechanism gaussian: BatchNormMLP has buffers (norm.running_mean" in lines[1]
    assert "personalization.method: fedbn" in lines[1]


def test_compare_shows_epsilon_beside_accuracy():
    """compare.py's table ends each run's row with the epsilon spent at its last evaluation."""
    from utils.compare import compare_table

    def run(name, privacy):
        record = {"round": 3, "global_test_acc": 0.5, "global_local": {"weighted_mean": 0.5, "mean": 0.5, "std": 0.1,
                                                                         "p10": 0.4}}
        return {"name": name, "config": {"strategy": "fedavg"},
                "history": [{**record, **({"privacy": privacy} if privacy else {})}]}
    rows = compare_table([run("dp", {"epsilon": 2.345, "delta": 1e-5}), run("clip", {"epsilon": None, "delta": 1e-5}),
                          run("plain", None)]).splitlines()
    assert rows[0].endswith("| epsilon (delta) |")
    assert rows[2].endswith("| 2.35 (delta 1e-05) |") and rows[3].endswith("| inf (delta 1e-05) |")
    assert rows[4].endswith("| no DP |")
