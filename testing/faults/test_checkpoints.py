"""Damaged checkpoints: a resume (or a reload) refuses them with one line naming the file, exit 2,
and writes nothing; a checkpoint holds the client rows in use, not the store's whole table."""
from __future__ import annotations

import pickle
import random
import shutil

import pytest
import torch

import e2e_trainer
from core.checkpoint import check_resumable, check_structure, load_checkpoint, save_atomic
from core.errors import UserError
from testing.conftest import run_trainer

SYNTHETIC = ["-dataPath", "unused", "-config", "experiments/synthetic/config.yaml", "-task", "synthetic"]
RUN = ["--set", "server_config.max_iteration=2", "--set", "server_config.val_freq=1",
       "--set", "server_config.ckpt_freq=1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real run of the synthetic task: 2 rounds, checkpoints/latest.pt and best.pt at round 2."""
    out = tmp_path_factory.mktemp("made")
    assert e2e_trainer.main([*SYNTHETIC, "-outputPath", str(out), "-run_name", "r", *RUN]) == 0
    return out / "r"


def _snapshot(folder):
    """Every file's bytes but the run lock's (a refused start takes its lock file away)."""
    return {f: f.read_bytes() for f in folder.rglob("*") if f.is_file() and f.name != "run.lock"}


def _nothing_in(out) -> bool:
    """No run folder, no file under -outputPath ``out`` (an empty ``out`` may be left)."""
    return not out.exists() or not any(out.iterdir())


def _state(run):
    return torch.load(run / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pfedsim: error: "), err
    return err[0]


def test_flipped_bytes_inside_a_tensor_are_refused_at_resume(made, tmp_path):
    """40 flipped bytes inside the global model's storage: a real resume stops with one line naming
    the file and what to do, exit 2, and the run folder stays as it was."""
    run = tmp_path / "r"
    shutil.copytree(made, run)
    path = run / "checkpoints" / "latest.pt"
    data = bytearray(path.read_bytes())
    start = data.find(_state(run)["global"].numpy().tobytes())
    assert start > 0, "the global model's bytes are stored as they are in memory"
    for offset in random.Random(0).sample(range(2762 * 4), 40):
        data[start + offset] ^= 0xFF
    path.write_bytes(bytes(data))
    before = _snapshot(run)
    proc = run_trainer([*SYNTHETIC, "-outputPath", str(tmp_path), "-run_name", "r", "-resume",
                        "--set", "server_config.max_iteration=3"])
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith(f"pfedsim: error: checkpoint {path} ") and "checksum" in err[0], err
    assert "best.pt" in err[0], "the line names the fix: the run's other checkpoint"
    assert _snapshot(run) == before


def _drop(key):
    return lambda s: s.pop(key)


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


def _store_widths(s):
    entries = s["client_store"]["entries"]
    cid = next(iter(entries))
    entries[cid] = torch.zeros(entries[cid].numel() + 1)


def _nan(s):
    s["global"][7] = float("nan")


def _inf(s):
    s["global"][0] = float("inf")


def _rng(s):
    del s["rng"]["numpy"]


# (case, change to a real checkpoint's dict, words the line must hold); each one is saved with a
# checksum over its (damaged) content, so that the structure checks themselves answer
DAMAGED = [
    *[(f"missing {key}", _drop(key), [key]) for key in
      ("round", "global", "server_optimizer", "client_store", "strategy_state", "history", "rng", "config")],
    ("round a string", _set("round", "2"), ["round", "'2'"]),
    ("round negative", _set("round", -1), ["round", "-1"]),
    ("round zero", _set("round", 0), ["round"]),
    ("round a bool", _set("round", True), ["round"]),
    ("global float64", lambda s: s.__setitem__("global", s["global"].double()), ["global", "float64"]),
    ("global int", lambda s: s.__setitem__("global", s["global"].long()), ["global", "int64"]),
    ("global 2-D", lambda s: s.__setitem__("global", s["global"].view(2, -1)), ["global", "1-D"]),
    ("global a list", lambda s: s.__setitem__("global", s["global"].tolist()), ["global", "list"]),
    ("global NaN", _nan, ["non-finite", "round 2"]),
    ("global inf", _inf, ["non-finite", "round 2"]),
    ("store rows of two widths", _store_widths, ["client_store", "width"]),
    ("store entries a list", lambda s: s["client_store"].__setitem__("entries", []), ["client_store"]),
    ("store a tensor", _set("client_store", torch.zeros(3)), ["client_store"]),
    ("strategy_state 2-D", _set("strategy_state", torch.zeros(2, 2)), ["strategy_state"]),
    ("server_optimizer a list", _set("server_optimizer", []), ["server_optimizer"]),
    ("history a dict", _set("history", {}), ["history"]),
    ("rng without numpy", _rng, ["rng", "numpy"]),
    ("elapsed_s a string", _set("elapsed_s", "1 s"), ["elapsed_s"]),
    ("config a string", _set("config", "a: 1"), ["config"]),
]


@pytest.mark.parametrize("case,change,words", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_checkpoint_is_refused_with_one_line(made, tmp_path, capsys, case, change, words):
    state = _state(made)
    change(state)
    path = tmp_path / "damaged.pt"
    save_atomic(state, path)
    code = e2e_trainer.main([*SYNTHETIC, "-outputPath", str(tmp_path / "out"), "-run_name", "x", "-resume", str(path),
                             "--set", "server_config.max_iteration=3"])
    line = _one_line(capsys)
    assert code == 2 and f"checkpoint {path}" in line and all(w in line for w in words), line
    assert _nothing_in(tmp_path / "out"), "nothing written for a refused checkpoint"


def _cut(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _edit_keeping_checksum(path):
    state = torch.load(path, weights_only=False)
    state["global"][3] += 1.0
    torch.save(state, path)


UNREADABLE = [
    ("truncated", _cut, "cut short"),
    ("empty", lambda p: p.write_bytes(b""), "empty"),
    ("text", lambda p: p.write_text("round: 2\n"), "not a pfedsim checkpoint"),
    ("a list", lambda p: torch.save([1, 2], p), "not a pfedsim checkpoint"),
    ("another dict", lambda p: torch.save({"model": torch.zeros(2)}, p), "not a pfedsim checkpoint"),
    ("edited after saving", _edit_keeping_checksum, "checksum"),
]


@pytest.mark.parametrize("case,damage,words", UNREADABLE, ids=[c[0] for c in UNREADABLE])
def test_unreadable_checkpoint_is_refused_with_one_line(made, tmp_path, capsys, case, damage, words):
    path = tmp_path / "latest.pt"
    shutil.copy(made / "checkpoints" / "latest.pt", path)
    damage(path)
    code = e2e_trainer.main([*SYNTHETIC, "-outputPath", str(tmp_path / "out"), "-run_name", "x", "-resume", str(path),
                             "--set", "server_config.max_iteration=3"])
    line = _one_line(capsys)
    assert code == 2 and f"checkpoint {path}" in line and words in line, line
    assert _nothing_in(tmp_path / "out")


def test_checkpoint_without_checksum_still_resumes(made, tmp_path, capsys):
    """A checkpoint written before checkpoints held a checksum (a plain torch.save of the dict) loads."""
    state = _state(made)
    state.pop("checksum", None)
    path = tmp_path / "old.pt"
    torch.save(state, path)
    assert e2e_trainer.main([*SYNTHETIC, "-outputPath", str(tmp_path), "-run_name", "x", "-resume", str(path),
                             "--set", "server_config.max_iteration=3"]) == 0
    assert _state(tmp_path / "x")["round"] == 3


def test_store_of_another_width_than_the_run_is_refused(made):
    """Rows all of one width, but not this run's: check_resumable refuses them when told the width."""
    path = made / "checkpoints" / "latest.pt"
    state = load_checkpoint(path)
    width = next(iter(state["client_store"]["entries"].values())).numel()
    check_structure(state, path, store_width=width)
    with pytest.raises(UserError, match=f"rows of {width} floats.*{width + 1}"):
        check_structure(state, path, store_width=width + 1)


def test_reload_verifies_the_checksum(made, tmp_path):
    """utils.experiment (evaluate.py --reload) reads checkpoints through load_checkpoint: a damaged
    best.pt is refused there too."""
    from utils.experiment import Experiment
    run = tmp_path / "r"
    shutil.copytree(made, run)
    _edit_keeping_checksum(run / "checkpoints" / "best.pt")
    exp = Experiment(run)
    with pytest.raises(UserError, match="checksum"):
        exp.checkpoint("best")
    assert exp.checkpoint("last")["round"] == 2


def test_checkpoint_holds_only_the_client_rows_in_use(tmp_path):
    """One client stored: the file is about the size of what it holds (the store's table has room for
    16 rows; all 16 used to be written)."""
    assert e2e_trainer.main([*SYNTHETIC, "-outputPath", str(tmp_path), "-run_name", "one", "--set",
                             "server_config.max_iteration=1", "--set", "server_config.num_clients_per_iteration=1",
                             "--set", "server_config.ckpt_freq=1"]) == 0
    path = tmp_path / "one" / "checkpoints" / "latest.pt"
    state = torch.load(path, weights_only=False)
    rows = list(state["client_store"]["entries"].values())
    assert len(rows) == 1 and rows[0].untyped_storage().nbytes() == rows[0].numel() * 4
    tensors = []
    rest = pickle.dumps(_strip(state, tensors))
    content = sum(t.numel() * t.element_size() for t in tensors) + len(rest)
    assert path.stat().st_size < 1.1 * content + 4096, (path.stat().st_size, content)


def _strip(obj, tensors):
    """``obj`` with its tensors taken out into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return None
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strip(v, tensors) for v in obj]
    return obj


def test_check_resumable_of_a_sound_checkpoint_passes(made):
    from core.config import load_config
    cfg = load_config("experiments/synthetic/config.yaml", [a for a in RUN if a != "--set"])
    check_resumable(made / "checkpoints" / "latest.pt", cfg, 2762)
