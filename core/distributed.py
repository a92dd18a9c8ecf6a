"""Process setup and transport of flat tensors (knows nothing about algorithms).

Launch modes: ``torch.distributed.run`` (RANK/WORLD_SIZE in the environment), ``mpiexec`` (rank
and size from mpi4py) or a plain single process (world size 1, no process group). On several
nodes, RANK is global and LOCAL_RANK (rank within the node) picks the GPU. A rank started by a
launcher watches it (:class:`LauncherWatch`) so that it does not outlive it; a collective that fails,
and a teardown that fails, raise the one-line :class:`PeerFailure`.
"""
from __future__ import annotations

import datetime
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: this module's functions take
# ``group=group.WORLD`` as a default argument, and torch imports it lazily (through torch._dynamo,
# when the first optimizer is built). Imported after init_process_group, those defaults would hold
# the process group past destroy_process_group, so its gloo threads would still run while the
# interpreter exits, where they can abort the process ("terminate called without an active
# exception"). Imported here, the defaults are None.
if dist.is_available():
    import torch.distributed.nn.functional  # noqa: F401,E402

from core.errors import UserError


class PeerFailure(RuntimeError):
    """A collective failed: a peer process died or the process-group timeout passed."""


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: ``rank`` 0 is the server; ``device`` is where it computes."""

    rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def workers(self) -> list[int]:
        """Ranks that train and evaluate clients: all of them. The server (rank 0) takes a share
        too, since it would otherwise wait idle between the broadcast and the reduce."""
        return list(range(self.world_size))


def mpi_environment() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT from MPI when launched by mpiexec
    (no-op otherwise, and when RANK is already set), then finalize MPI: the rounds run on
    torch.distributed only. Call it once, before reading RANK.

    Raises:
        UserError: launched by mpiexec but mpi4py is missing.
    """
    if "RANK" in os.environ or not any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return
    try:
        from mpi4py import MPI
    except ImportError:
        raise UserError("launched by mpiexec but mpi4py is missing; pip install -e \".[mpi]\"") from None
    comm = MPI.COMM_WORLD
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(comm.Get_rank()), str(comm.Get_size())
    # rank among the processes of this node (picks the GPU), from any MPI: ranks sharing memory
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    os.environ.setdefault("LOCAL_RANK", str(node.Get_rank()))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(node.Get_size()))
    node.Free()
    os.environ.setdefault("MASTER_ADDR", comm.bcast(MPI.Get_processor_name(), root=0))
    os.environ.setdefault("MASTER_PORT", str(comm.bcast(_free_port() if comm.Get_rank() == 0 else None, root=0)))
    # MPI's part ends here: finalize now rather than at interpreter exit, so that MPI's teardown
    # never overlaps torch.distributed's (gloo threads, the TCP store) in a process that is exiting.
    MPI.Finalize()


def host_to_device(data, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host data (a numpy array or a list of numbers) as a tensor on ``device``, without making the
    host wait for the GPU. A copy from pageable memory (``torch.tensor(data, device="cuda")``, even
    with ``non_blocking``) may synchronize the CUDA stream, which inside a training loop would stall
    the launch queue at every call; staging in pinned memory makes the copy asynchronous, and
    PyTorch's pinned-memory cache keeps the staging buffer alive until the copy has run."""
    host = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _device(preference: str, backend: str, local_rank: int, local_world: int) -> torch.device:
    if preference == "cpu":
        if backend == "nccl":
            raise UserError("-backend nccl needs GPUs but config device is cpu; use -backend gloo or device: auto")
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", gpu_index(local_rank, local_world, torch.cuda.device_count(), backend))
    if preference == "cuda" or backend == "nccl":
        raise UserError("no CUDA GPU is visible; use -backend gloo and device: auto or cpu")
    return torch.device("cpu")


def gpu_index(local_rank: int, local_world: int, gpus: int, backend: str) -> int:
    """The GPU of the process ``local_rank`` of ``local_world`` processes on a node with ``gpus`` GPUs.

    With gloo several processes may share a GPU (``local_rank % gpus``). NCCL refuses two ranks on one
    GPU (it fails at the first collective, "Duplicate GPU detected").

    Raises:
        UserError: nccl with more processes on the node than GPUs.
    """
    if backend == "nccl" and local_world > gpus:
        raise UserError(f"-backend nccl needs one GPU per process, but {local_world} processes share {gpus} GPU(s) "
                        f"on this node; launch at most {gpus} per node, or use -backend gloo (processes may share a GPU)")
    return local_rank % gpus


def init_distributed(backend: str, device_preference: str, timeout_s: float) -> DistContext:
    """Initialise the process group if launched with several processes; pick the device.

    Raises:
        UserError: nccl without a GPU or with more processes than GPUs on a node, or mpiexec without mpi4py.
    """
    mpi_environment()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = _device(device_preference, backend, int(os.environ.get("LOCAL_RANK", 0)),
                     int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=device if backend == "nccl" else None)
        except RuntimeError as exc:  # DistNetworkError / DistStoreError: the rendezvous failed or timed out
            raise PeerFailure(f"rank {rank}: could not join the process group of {world} ranks at "
                              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}; "
                              f"{_first_line(exc)}") from exc
    return DistContext(rank, world, device, backend)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def launcher_name() -> str | None:
    """The launcher this rank cannot outlive: ``torch.distributed.run`` (it sets TORCHELASTIC_RUN_ID;
    its agent also holds the ranks' TCP store) or ``mpiexec`` (an MPI process manager's rank:
    OMPI_COMM_WORLD_SIZE or PMI_SIZE); None for a plain process, which must outlive the shell that
    started it (under nohup, say), and for a submitit task."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torch.distributed.run"
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return "mpiexec"
    return None


class LauncherWatch:
    """Notices the death of this rank's launcher, its parent process: a daemon thread compares
    ``os.getppid()`` with the parent recorded at start every ``poll_s`` seconds (the kernel
    reparents the orphaned rank, so the parent pid changes however the launcher died, SIGKILL
    included). Under mpiexec the parent is its process manager's proxy (hydra_pmi_proxy, orted).

    Polling rather than ``prctl(PR_SET_PDEATHSIG)``: that signal fires when the parent *thread*
    that started the rank exits, and would reach the rank as a signal indistinguishable from a
    user's ``kill``.
    """

    def __init__(self, name: str, poll_s: float = 0.2):
        self.pid = os.getppid()
        try:
            with open(f"/proc/{self.pid}/comm") as f:
                comm = f.read().strip()
        except OSError:  # not Linux
            comm = ""
        # under mpiexec the parent is its process manager's proxy: name it too
        self.name = f"{name}'s {comm}" if name == "mpiexec" and comm not in ("", name) else name
        self.poll_s = poll_s
        self._done = threading.Event()

    def died(self) -> bool:
        """True once the launcher is gone (checked now, not at the last poll)."""
        return os.getppid() != self.pid

    def describe(self) -> str:
        """'the launcher (NAME, pid N)'."""
        return f"the launcher ({self.name}, pid {self.pid})"

    def start(self, on_death: Callable[[], None]) -> None:
        """Call ``on_death()`` once, from the watching thread, when the launcher dies (unless
        :meth:`stop` came first)."""
        def watch():
            while not self._done.wait(self.poll_s):
                if self.died():
                    self._fired = True
                    on_death()
                    return
        self._thread = threading.Thread(target=watch, name="pfedsim-launcher-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the watch and wait for its thread (from any other thread). A daemon thread still
        running while the interpreter exits is ended by pthread_exit, whose forced unwinding through
        C++ frames can abort the process ("terminate called without an active exception"). A watch
        that saw the launcher die is not waited for: its ``on_death`` decides how the process ends."""
        self._done.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and not getattr(self, "_fired", False) and thread is not threading.current_thread():
            thread.join()  # a watch that fired ends the process itself (on_death), it is not waited for


class Transport:
    """Broadcast from rank 0 and sum-reduce to rank 0 of flat tensors; identity for one process."""

    def __init__(self, ctx: DistContext, launcher: LauncherWatch | None = None):
        self.ctx = ctx
        # Under torch.distributed.run the TCP store lives in the launcher: once it died, the store is
        # not touched (each try would print a C++ warning with a stack of frames).
        self.launcher = launcher
        self.comm_device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
        # The last collective's buffer, kept until close(): the backend's work object may still hold it, and if
        # the backend's thread dropped the last reference at teardown it would need the GIL that close() holds
        # while joining that thread (a deadlock seen with gloo on torch 2.4 under mpiexec).
        self._held: torch.Tensor | None = None
        # time.monotonic() when a collective first failed on this rank (None while none did): a signal
        # that comes after it is the failure's fallout (torch.distributed.run sends SIGTERM to every
        # rank once one has died), and the failure, not the signal, is what this rank reports
        self.failed_at: float | None = None

    def _store(self):
        if self.launcher is not None and self.launcher.died():
            return None
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # private API: diagnostics only, never required
            return None

    def _laggards(self, what: str, grace_s: float = 2.0) -> list[str]:
        """On the server after a failure: workers whose last announced collective is not ``what``.
        A live worker may still be finishing its share when a dead peer makes the collective fail,
        so the workers get ``grace_s`` seconds to announce ``what`` before they are named."""
        deadline = time.monotonic() + grace_s
        found = self._behind(what)
        while found and time.monotonic() < deadline:
            time.sleep(0.1)
            found = self._behind(what)
        return found

    def _behind(self, what: str) -> list[str]:
        store = self._store()
        if store is None:
            return []
        found = []
        for rank in range(1, self.ctx.world_size):
            key = f"pfedsim/at/{rank}"
            try:
                last = store.get(key).decode() if store.check([key]) else "nothing"
            except Exception:
                last = "unknown"
            if last != what:
                found.append(f"rank {rank} stopped at '{last}'")
        return found

    def _run(self, op, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if self.ctx.world_size == 1:
            return tensor
        buf = self._held = tensor.to(self.comm_device)
        store = self._store() if self.ctx.rank > 0 else None
        try:
            if store is not None:  # under torch.distributed.run the store lives in the launcher: this fails
                store.set(f"pfedsim/at/{self.ctx.rank}", what)  # (DistNetworkError) once the launcher is gone
            op(buf, 0)
        except Exception as exc:  # gloo/nccl raise RuntimeError subclasses with backend details
            # First, and through a call: a signal delivered before the failure (a Ctrl-C, which made a
            # peer close its connections) is handled right after this call returns, before the store
            # of failed_at, so it stays an interruption.
            failed_at = time.monotonic()
            self.failed_at = failed_at
            first = _first_line(exc)
            if self.ctx.rank == 0:
                who = "; ".join(self._laggards(what)) or "a worker died or timed out"
                raise PeerFailure(f"{what} failed on the server: {who} (see that rank's log); {first}") from exc
            raise PeerFailure(f"rank {self.ctx.rank}: {what} failed; the server or a peer died or timed out; "
                              f"{first}") from exc
        return buf.to(self.ctx.device)

    def broadcast(self, tensor: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (others pass a buffer of the same shape)."""
        return self._run(lambda t, src: dist.broadcast(t, src), tensor, what)

    def reduce_sum(self, tensor: torch.Tensor, what: str = "reduce") -> torch.Tensor:
        """Elementwise sum over ranks, valid on rank 0."""
        return self._run(lambda t, dst: dist.reduce(t, dst, op=dist.ReduceOp.SUM), tensor, what)

    def all_reduce_max(self, tensor: torch.Tensor, what: str = "all-reduce max") -> torch.Tensor:
        """Elementwise maximum over ranks, valid on every rank."""
        return self._run(lambda t, _: dist.all_reduce(t, op=dist.ReduceOp.MAX), tensor, what)

    def close(self, error: BaseException | None = None, barrier: bool | None = None) -> None:
        """Tear the process group down; call it once, when this rank stops.

        After a normal finish (``error`` None) or a mistake or failure (an ``Exception``), a barrier
        comes first, so no rank destroys its connections while a peer still uses them. After
        ``SystemExit`` or ``KeyboardInterrupt`` (preempted: submitit's signal handler exits this
        way; or interrupted) there is no barrier, since the peers may be mid-round; ``barrier``
        False skips it after any ``error`` too (a failure seen while the run was being stopped:
        the launcher died, say). The frames of
        ``error``'s tracebacks (its causes' too) are cleared first: a collective that failed, or was
        interrupted between its launch and its wait, holds the process group and its work through
        them, and a group that outlives this call keeps gloo threads running while the interpreter
        exits, which can abort the process.

        Raises:
            PeerFailure: after a normal finish (``error`` None), when destroying the group fails (a
                peer or the launcher's store died meanwhile). With an ``error``, that failure is
                dropped: ``error`` is what gets reported.
        """
        _clear_frames(error)
        if self.ctx.world_size > 1 and dist.is_initialized():
            if barrier is None:
                barrier = error is None or isinstance(error, Exception)
            if barrier:
                try:
                    dist.barrier()
                except Exception:  # a peer already failed; that failure is what gets reported
                    pass
            try:
                dist.destroy_process_group()
            except Exception as exc:  # DistBackendError / DistNetworkError from a group whose peers are gone
                first = _first_line(exc)
                _clear_frames(exc)
                self._held = None
                if error is None:
                    raise PeerFailure(f"rank {self.ctx.rank}: tearing the process group down failed; a peer or "
                                      f"the launcher died meanwhile; {first}") from None
        self._held = None


def _clear_frames(error: BaseException | None) -> None:
    """Drop the locals of the finished frames in the tracebacks of ``error`` and of the exceptions
    it was raised from or during."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
