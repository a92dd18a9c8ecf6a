"""The client store: exact round trips in memory and spilled to a memory-mapped file."""
from __future__ import annotations

import torch

from core.client_store import ClientStore
from testing.conftest import load_ckpt, run_trainer


def _fill(store, ids, width):
    for cid in ids:
        store.put(cid, torch.full((width,), float(cid)) + torch.arange(width))


def _check(store, ids, width):
    for cid in ids:
        assert torch.equal(store.get(cid, None), torch.full((width,), float(cid)) + torch.arange(width)), cid


def test_in_memory_store_round_trips_and_overwrites():
    store = ClientStore()
    _fill(store, range(100), 7)
    store.put(5, torch.zeros(7))
    assert len(store) == 100 and 5 in store and 100 not in store and not store.on_disk
    assert torch.equal(store.get(5, None), torch.zeros(7)) and store.get(100, "absent") == "absent"
    _check(store, [0, 42, 99], 7)
    try:
        store.put(1, torch.zeros(8))
    except ValueError as exc:
        assert "7 floats" in str(exc)
    else:
        raise AssertionError("a vector of another width must be refused")


def test_store_spills_to_a_file_past_its_memory_limit_and_keeps_every_row(tmp_path):
    path, width = tmp_path / "store.f32", 10
    store = ClientStore(path, memory_limit_bytes=10 * 1024)
    _fill(store, range(200), width)
    assert not store.on_disk and not path.exists(), "256 rows x 40 B = 10 KiB still fit"
    _fill(store, range(200, 3000), width)
    assert store.on_disk and path.stat().st_size >= 3000 * width * 4
    _check(store, [0, 199, 200, 2999], width)
    saved = tmp_path / "ckpt.pt"
    torch.save({"client_store": store.state_dict()}, saved)
    other = ClientStore(tmp_path / "other.f32", memory_limit_bytes=10 * 1024)
    other.load_state_dict(torch.load(saved, mmap=True)["client_store"])
    assert len(other) == 3000 and other.on_disk
    _check(other, range(0, 3000, 7), width)
    store.close()
    assert not path.exists() and len(store) == 0


def test_spilled_run_equals_in_memory_run(tmp_path):
    args = ["-dataPath", "unused", "-outputPath", str(tmp_path), "-config", "experiments/synthetic/config.yaml",
            "-task", "synthetic", "--set", "server_config.max_iteration=6", "--set", "server_config.ckpt_freq=3"]
    memory = run_trainer(args + ["-run_name", "memory"])
    spill = run_trainer(args + ["-run_name", "spill", "--set", "server_config.client_store_memory_mb=0.0001",
                                "--set", "server_config.max_iteration=3"])
    resumed = run_trainer(args + ["-run_name", "spill", "--set", "server_config.client_store_memory_mb=0.0001",
                                  "-resume"])
    assert memory.returncode == spill.returncode == resumed.returncode == 0, resumed.stderr[-1500:]
    a, b = load_ckpt(tmp_path / "memory"), load_ckpt(tmp_path / "spill")
    assert torch.equal(a["global"], b["global"])
    assert a["client_store"]["entries"].keys() == b["client_store"]["entries"].keys()
    for cid, vec in a["client_store"]["entries"].items():
        assert torch.equal(vec, b["client_store"]["entries"][cid])
    assert not (tmp_path / "spill" / "client_store.f32").exists(), "the spill file goes when the run ends"


def test_state_dict_holds_only_the_rows_in_use(tmp_path):
    """Saved, a store of 3 rows (in a table with room for 16) or of 300 spilled rows (a file with room
    for 512) is those rows' bytes, not the table's; and it loads back."""
    for spill in (None, tmp_path / "store.f32"):
        store, rows = ClientStore(spill, memory_limit_bytes=1024 if spill else float("inf")), 3 if spill is None else 300
        _fill(store, range(rows), 10)
        assert store.on_disk == (spill is not None)
        state = store.state_dict()
        storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in state["entries"].values()}
        assert list(storages.values()) == [rows * 10 * 4], storages  # what torch.save writes
        saved = tmp_path / "ckpt.pt"
        torch.save(state, saved)
        other = ClientStore()
        other.load_state_dict(torch.load(saved))
        _check(other, range(rows), 10)
        store.close()
