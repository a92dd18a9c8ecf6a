"""Run one experiment on this rank: build the simulation, then serve (rank 0, which also trains a share)
or work (ranks >= 1); stop with one line on SIGINT, SIGTERM or the launcher's death."""
from __future__ import annotations

import _thread
import gc
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from core.distributed import LauncherWatch, PeerFailure, Transport, init_distributed, launcher_name
from core.errors import RunStopped, UserError
from core.observers import RunStart
from core.server import Server
from core.simulation import build_simulation
from core.worker import run_worker


class Interrupted(RunStopped):
    """The run was stopped by SIGINT (Ctrl-C; exit status 130) or SIGTERM (143).

    On rank 0 the message names the round in progress and what to pass to ``-resume`` (the run
    folder, whose ``checkpoints/latest.pt`` is intact: checkpoints are written atomically); on the
    other ranks it is empty, since the server says it.
    """

    exit_code = 130

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class LauncherDied(RunStopped):
    """This rank's launcher (torch.distributed.run, or mpiexec's process manager) died, killed with
    SIGKILL say: every rank stops within seconds with one line (rank 0's names the checkpoint to
    resume from) instead of training on, or waiting out the process-group timeout. Exit status 1."""

    exit_code = 1


class _Signalled(KeyboardInterrupt):
    """Raised in the main thread by the stop handler: a KeyboardInterrupt, so that the teardown
    treats it as one (no barrier: the peers may be mid-round). ``signum`` is None when the
    launcher's death interrupted the main thread."""

    def __init__(self, signum: int | None):
        super().__init__(signal.Signals(signum).name if signum else "launcher died")
        self.signum = signum


class _Stops:
    """What stops a run from outside, while it runs: SIGINT and SIGTERM (their handlers are replaced
    only where they are Python's defaults: submitit's SIGTERM handler, say, stays), and the death of
    the launcher (see :class:`LauncherWatch`).

    The first of them raises :class:`_Signalled` in the main thread. From :meth:`hold` on (the run is
    stopping) further signals are only recorded: a launcher may forward a signal the ranks already
    had (mpiexec and a Ctrl-C), and an exception raised in the middle of the teardown would print a
    traceback. A signal that comes after a collective failed on this rank is ignored: it is the
    failure's fallout (torch.distributed.run sends SIGTERM to every rank once one has died), and the
    failure is what this rank reports. After a stop, a rank started by a launcher keeps ignoring
    signals until it exits; otherwise (a plain process, the caller's own process) the previous
    handlers come back.
    """

    GRACE_S = 4.0  # after the launcher's death, how long the main thread has to stop by itself

    def __init__(self, run_dir: Path, resume: Path | None):
        self.run_dir, self.resume = run_dir, resume
        self.rank = int(os.environ.get("RANK", 0))
        self.server: Server | None = None  # set by _serve once built: the round and checkpoint to report
        self.transport: Transport | None = None  # set once built: did a collective fail before a signal?
        self.signum: int | None = None
        self.holding = False
        self.launcher_gone = False
        self.finished = False  # the run ended (however), so the watch leaves the process alone
        self.reported = False  # a stop line is printed, or on its way (raised to the caller)
        self._lock = threading.Lock()
        self._nudged = False  # the pending SIGINT is the watch's interrupt_main, not a user's
        self._previous: dict[int, Any] = {}  # signal number -> the handler it had
        self.watch: LauncherWatch | None = None  # under a launcher

    # ---- set up and take down ----------------------------------------------------------------
    def __enter__(self) -> "_Stops":
        if threading.current_thread() is threading.main_thread():
            for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
                if signal.getsignal(signum) is default:
                    self._previous[signum] = default
                    signal.signal(signum, self._handle)
        name = launcher_name()
        if name is not None:
            self.watch = LauncherWatch(name)
            self.watch.start(self._launcher_died)
        return self

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self.finished = True
        if self.watch is not None:
            self.watch.stop()
        stopped = self.launcher_gone or self.signum is not None
        if stopped and launcher_name() is not None:
            return  # the launcher forwards signals the rank already had: keep ignoring them until exit
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def hold(self) -> None:
        """The run is stopping: from now on signals are recorded, not raised."""
        self.holding = True

    # ---- the events ---------------------------------------------------------------------------
    def _handle(self, signum: int | None, frame) -> None:
        if self._nudged:
            self._nudged = False
            signum = None  # the launcher's death, not a user's Ctrl-C
        elif self.transport is not None and self.transport.failed_at is not None:
            return  # a collective failed first: the signal is its fallout, the failure is reported
        elif self.signum is None:
            self.signum = signum
        if not self.holding:
            self.holding = True
            raise _Signalled(signum)

    def _launcher_died(self) -> None:
        """In the watch thread: interrupt the main thread, which stops the run and reports; if it
        has not within GRACE_S (blocked in a collective whose peers are gone, or in the teardown),
        print this rank's line and exit. A checkpoint being written then is left whole: they are
        written to a temporary name and renamed."""
        self.launcher_gone = True
        owned = [s for s in (signal.SIGINT, signal.SIGTERM) if s in self._previous]  # handlers that are ours
        if owned and not self.holding:
            self._nudged = True
            _thread.interrupt_main(owned[0])  # runs _handle in the main thread, between two bytecodes
        deadline = time.monotonic() + self.GRACE_S
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.finished and not self.reported:
                return  # the run ended without a stop (it finished just now): nothing to say
        with self._lock:
            if self.finished and not self.reported:
                return
            if not self.reported:
                self.reported = True
                try:
                    os.write(2, f"pfedsim: error: {self.launcher_message()}\n".encode())
                except OSError:  # nobody reads our stderr any more
                    pass
            os._exit(LauncherDied.exit_code)  # the line is out; peers and launcher are gone: no teardown

    # ---- what to report -----------------------------------------------------------------------
    def stopping(self, error: BaseException | None) -> bool:
        """Whether a signal or the launcher's death (checked now) ended the run."""
        if self.watch is not None and not self.launcher_gone:
            # A collective or the launcher's store may fail a moment before the kernel reparents this
            # rank (the dying launcher's sockets close first): give the death that moment to show.
            settle = time.monotonic() + (0.5 if isinstance(error, PeerFailure) else 0.0)
            while not self.watch.died() and time.monotonic() < settle:
                time.sleep(0.02)
            self.launcher_gone = self.watch.died()
        return self.launcher_gone or self.signum is not None or isinstance(error, KeyboardInterrupt)

    def stop_error(self, error: BaseException) -> RunStopped | None:
        """The one-line stop for a run that ended with ``error``; None when neither a signal nor the
        launcher's death stopped it."""
        if not self.stopping(error):
            return None
        stop: RunStopped
        if self.launcher_gone and self.signum is None:  # a signal came first: the launcher died of it too
            stop = LauncherDied(self.launcher_message())
        else:
            signum = self.signum or signal.SIGINT
            stop = Interrupted(self.interrupt_message(signum) if self.rank == 0 else "", 128 + signum)
        with self._lock:
            if self.reported:  # the watch printed it and is exiting the process
                stop.args = ("",)
            self.reported = True
        return stop

    def interrupt_message(self, signum: int) -> str:
        return f"interrupted {self._where()} by {signal.Signals(signum).name}; {self._resume_hint()}"

    def launcher_message(self) -> str:
        died = f"rank {self.rank}: {self.watch.describe() if self.watch else 'the launcher'} died"
        if self.rank != 0:
            return f"{died}; stopping"
        return f"{died}; stopped {self._where()}; {self._resume_hint()}"

    def _where(self) -> str:
        server = self.server
        if server is None:
            return "while starting"
        if server.round < server.start_round:
            return f"before round {server.start_round}"
        return f"at round {server.round}"

    def _resume_hint(self) -> str:
        latest = self.run_dir / "checkpoints" / "latest.pt"
        if latest.is_file():
            saved = self.server.saved_round if self.server is not None else 0
            return f"continue with -resume {self.run_dir}" + (f" (its checkpoint of round {saved})" if saved else "")
        if self.resume is not None:
            return f"continue with -resume {self.resume}"
        return "no checkpoint was written yet (every server_config.ckpt_freq rounds): nothing to resume"


def run_experiment(cfg, task, data_path: str | None, run_dir: Path, backend: str, resume: Path | None,
                   observers=None):
    """Run the whole experiment; returns the evaluation records on rank 0, None elsewhere.

    ``observers()``, when given, builds on rank 0 the run's observers (core/observers.py: what the
    run writes besides its checkpoints); without it the run writes checkpoints only. Once every rank
    has built the run, each hears :meth:`~core.observers.RunObserver.opening` in turn (e2e_trainer:
    the run folder's lock, checks and run.json), before the server reads a checkpoint; a UserError
    there stops every rank at once, as a server start error does.

    Raises:
        UserError: data, partition or model mistakes, or a refusal at ``opening`` (before any round starts).
        PeerFailure: a peer process died or timed out during a collective.
        Interrupted: SIGINT (exit status 130) or SIGTERM (143); rank 0's message says the round and
            the ``-resume`` that continues the run, the other ranks' is empty.
        LauncherDied: torch.distributed.run or mpiexec died under this rank (one line per rank).
    """
    stops = _Stops(run_dir, resume)
    with stops:
        transport = None
        try:
            ctx = init_distributed(backend, cfg.device, cfg.server_config.timeout_s)
            stops.rank = ctx.rank
            transport = stops.transport = Transport(ctx, stops.watch)
            sim = build_simulation(cfg, task, data_path, ctx, transport)
            history = None  # on workers
            if ctx.rank == 0:
                history = _serve(sim, run_dir, resume, stops, observers)
            else:
                run_worker(sim)
        except BaseException as exc:  # SystemExit included: submitit exits this way on preemption
            _close(transport, exc, stops)
            stop = stops.stop_error(exc)
            if stop is not None:
                if stops.watch is not None:  # a launched rank's process ends here: spare it the interpreter's
                    gc.freeze()  # last garbage collection over every torch object (~2 s of a 2.3 s exit)
                raise stop from None
            raise
        _close(transport, None, stops)
    return history


def _close(transport: Transport | None, error: BaseException | None, stops: _Stops) -> None:
    """Close the transport once the run ended with ``error`` (None: finished): no barrier after a
    signal or the launcher's death, since the peers may be mid-round. A signal handled just before
    :meth:`_Stops.hold` took effect interrupts this at most once, and is absorbed."""
    while True:
        try:
            stops.hold()
            if transport is not None:
                transport.close(error, barrier=False if stops.stopping(error) else None)
            return
        except _Signalled:
            continue


def _serve(sim, run_dir: Path, resume: Path | None, stops: _Stops | None = None, observers=None):
    """Rank 0: build the observers, open the run to them (:class:`RunStart`), then build the server
    and run it; if opening or building fails (a refused run folder, a missing checkpoint, say), tell
    the workers to stop (start round -1) before raising, so they do not wait for the timeout."""
    try:
        told = list(observers()) if observers is not None else []
        start = RunStart(sim.layout.numel, sim.store_width, sim.ctx.world_size, resume)
        for observer in told:
            observer.opening(start)
        server = Server(sim, run_dir, resume, told)
    except UserError:
        sim.transport.broadcast(torch.tensor([-1.0], device=sim.ctx.device), "start broadcast")
        raise
    if stops is not None:
        stops.server = server
    return server.run()
