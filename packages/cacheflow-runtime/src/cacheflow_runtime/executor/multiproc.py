"""The multiprocess executor: one spawned worker process per tensor-parallel rank on this host.

Each step's :class:`SchedulerOutput` is pickled once and the same bytes go down a pipe to every
worker; only rank 0 answers with the :class:`ModelRunnerOutput` (the others write only when
they fail). A step is sent when it is started and its answer read when its handle is: the next
step may be sent before, and each worker runs the steps in the order its pipe delivers them.
Failures end the engine instead of hanging it:

- a worker that dies (its process sentinel fires) or raises (it sends its traceback) fails the
  call at once, with an error naming its rank;
- a worker that stops (hung, stopped, swapped out) is noticed by its heartbeat: each worker
  stamps a shared-memory slot twice a second, and a slot older than ``hang_timeout_s`` (default
  30 s, ``CACHEFLOW_WORKER_TIMEOUT_S``) fails the call naming that rank;
- every exit path reaps the children: ``shutdown`` (asks, then terminates, then kills), a
  finalizer when the executor is collected or the interpreter exits (also after Ctrl-C; it runs
  before ``multiprocessing`` joins its children at exit), and in each worker a watchdog that exits
  when the driver process is gone (SIGTERM / SIGKILL of the driver). Workers ignore SIGINT: a
  Ctrl-C in the terminal reaches the whole process group, and the driver shuts them down. Once
  started they ignore SIGTERM too while the driver lives (a SIGTERM to the process group, as
  systemd sends, must not cut a server's graceful drain short); ``shutdown`` closes their pipes
  before it terminates them.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import signal
import threading
import time
import traceback
from multiprocessing.process import BaseProcess
from typing import Any, Optional

import torch

from cacheflow_runtime.core.step_data import ModelRunnerOutput, SchedulerOutput
from cacheflow_runtime.distributed.environment import get_open_port
from cacheflow_runtime.executor.base import RankExecutor
from cacheflow_runtime.executor.rank_worker import RankWorker, WorkerFailedError, WorkerSpec

logger = logging.getLogger(__name__)

ENV_WORKER_TIMEOUT = "CACHEFLOW_WORKER_TIMEOUT_S"
DEFAULT_HANG_TIMEOUT_S = 30.0
_HEARTBEAT_PERIOD_S = 0.5
_POLL_S = 0.5
# After a worker reports an error, how long to look for a worker that died at the same time:
# a peer's death makes the survivors' collectives fail, and the dead one is the cause to name.
_DEATH_GRACE_S = 2.0


def _heartbeat(slot: Any, rank: int, parent_pid: int) -> None:
    """Stamps this rank's heartbeat slot; exits the process when the driver is gone."""
    while True:
        slot[rank] = time.monotonic()
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(_HEARTBEAT_PERIOD_S)


def _ignore_sigterm_while_driver_lives(parent_pid: int) -> None:
    """SIGTERM stops this worker only once the driver is gone: the driver stops it (pipe
    closed or ``shutdown``) after its own graceful shutdown."""

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getppid() != parent_pid:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def _send_error(conn: multiprocessing.connection.Connection, rank: int, what: str) -> None:
    try:
        conn.send(("error", f"{what} on rank {rank}:\n{traceback.format_exc()}"))
    except (OSError, ValueError):
        pass


def _worker_main(spec: WorkerSpec, rank: int, device: str,
                 conn: multiprocessing.connection.Connection, heartbeats: Any,
                 parent_pid: int) -> None:
    """The loop of one worker process: build the rank, then serve calls until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_heartbeat, args=(heartbeats, rank, parent_pid),
                     name="cacheflow-heartbeat", daemon=True).start()
    try:
        worker = RankWorker(spec, rank, torch.device(device))
        _ignore_sigterm_while_driver_lives(parent_pid)
        conn.send(("ok", worker.backend()))
    except BaseException:
        _send_error(conn, rank, "starting the worker failed")
        return
    try:
        while True:
            try:
                kind, payload = pickle.loads(conn.recv_bytes())
            except EOFError:
                break  # the driver closed the pipe
            if kind == "shutdown":
                break
            try:
                if kind == "step":
                    output = worker.execute_model(payload)
                    if rank == 0:
                        conn.send(("ok", output))
                else:
                    method, args = payload
                    conn.send(("ok", getattr(worker, method)(*args)))
            except BaseException:
                _send_error(conn, rank, f"{kind} {payload[0] if kind == 'call' else ''}".strip())
    finally:
        worker.shutdown()


def _reap(processes: list[BaseProcess], conns: list[Any], timeout: float = 5.0) -> None:
    """Asks every worker to stop, then closes the pipes and terminates and kills what is
    left (workers never started, when starting one failed, are only dropped)."""
    message = pickle.dumps(("shutdown", None))
    for proc, conn in zip(processes, conns):
        if proc.pid is not None and proc.is_alive():
            try:
                conn.send_bytes(message)
            except (OSError, ValueError):
                pass
    processes = [proc for proc in processes if proc.pid is not None]  # those started
    deadline = time.monotonic() + timeout
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
    if any(proc.is_alive() for proc in processes):
        # A started worker ignores SIGTERM while this process lives; the end of its pipe stops
        # it. SIGTERM stops a worker still starting.
        for conn in conns:
            conn.close()
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
    for conn in conns:
        conn.close()


def _exit_description(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def local_init_method() -> str:
    """A rendezvous address on this host for a new group of worker processes."""
    return f"tcp://127.0.0.1:{get_open_port()}"


class MultiprocExecutor(RankExecutor):
    """``tensor_parallel_size`` worker processes on this host (rank r on ``cuda:r``, or on the
    CPU over gloo), started with the ``spawn`` method."""

    def __init__(self, spec: WorkerSpec, devices: list[str],
                 hang_timeout_s: Optional[float] = None) -> None:
        if len(devices) != spec.world_size:
            raise ValueError(f"{len(devices)} devices for {spec.world_size} ranks")
        self.world_size = spec.world_size
        self.hang_timeout_s = (float(os.environ.get(ENV_WORKER_TIMEOUT, DEFAULT_HANG_TIMEOUT_S))
                               if hang_timeout_s is None else hang_timeout_s)
        self._failure: Optional[WorkerFailedError] = None
        ctx = multiprocessing.get_context("spawn")
        # 0.0: the worker has not started beating yet (it is importing torch and the model).
        self._heartbeats = ctx.Array("d", self.world_size, lock=False)
        self.processes: list[BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        child_conns = []
        for rank, device in enumerate(devices):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_worker_main, name=f"cacheflow-worker-{rank}",
                               args=(spec, rank, device, child_conn, self._heartbeats,
                                     os.getpid()),
                               daemon=True)
            self.processes.append(proc)
            self._conns.append(parent_conn)
            child_conns.append(child_conn)
        # Not weakref.finalize: at exit multiprocessing terminates its daemonic children and
        # joins them without a timeout, and whether weakref's exit hook runs before that
        # depends on the import order (atexit is LIFO). A started worker ignores SIGTERM while
        # this process lives, so that join would hang; multiprocessing runs its own finalizers
        # (exitpriority >= 0) first.
        self._finalizer = multiprocessing.util.Finalize(
            self, _reap, args=(self.processes, self._conns), exitpriority=10)
        for proc in self.processes:
            proc.start()
        for conn in child_conns:
            conn.close()
        backends = self._collect(range(self.world_size), "starting the workers")
        self.backend = backends[0]
        logger.info("%d worker processes (pids %s), collectives over %s", self.world_size,
                    [p.pid for p in self.processes], self.backend)

    @classmethod
    def for_host(cls, spec: WorkerSpec) -> MultiprocExecutor:
        """One rank per device of this host: ``cuda:0..N-1``, or all on the CPU."""
        if spec.device_type == "cuda":
            devices = [f"cuda:{r}" for r in range(spec.world_size)]
        else:
            devices = ["cpu"] * spec.world_size
        return cls(spec, devices)

    # ------------------------------------------------------------------------------- calls
    def _broadcast(self, message: tuple[str, Any]) -> None:
        if self._failure is not None:
            raise self._failure
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(payload)
            except (OSError, ValueError):
                self._fail(self._death_error(rank, "while the step was sent"))

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        self._broadcast(("call", (method, args)))
        return self._collect(range(self.world_size), method)

    def _collect(self, ranks: range | list[int], what: str) -> list[Any]:
        """Waits for an answer from each of ``ranks``; fails on any worker's death, error or
        silence, whichever rank it comes from."""
        if self._failure is not None:
            raise self._failure
        pending = set(ranks)
        results: dict[int, Any] = {}
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self.processes)}
        conns = {id(conn): rank for rank, conn in enumerate(self._conns)}
        while pending:
            ready = multiprocessing.connection.wait(list(self._conns) + list(sentinels),
                                                    timeout=_POLL_S)
            for obj in ready:
                if isinstance(obj, int):
                    rank = sentinels[obj]
                    if not self._conns[rank].poll():
                        self._fail(self._death_error(rank, f"during {what}"))
                    continue
                rank = conns[id(obj)]
                try:
                    status, value = obj.recv()
                except (EOFError, OSError):
                    self._fail(self._death_error(rank, f"during {what}"))
                if status == "error":
                    self._fail(self._blame(rank, value))
                if rank in pending:
                    results[rank] = value
                    pending.discard(rank)
            self._check_heartbeats(what)
        return [results[r] for r in ranks]

    def _death_error(self, rank: int, when: str) -> WorkerFailedError:
        proc = self.processes[rank]
        proc.join(1.0)
        return WorkerFailedError(
            f"tensor-parallel worker rank {rank} (pid {proc.pid}) "
            f"{_exit_description(proc.exitcode)} {when}; the engine has stopped", rank)

    def _blame(self, rank: int, report: str) -> WorkerFailedError:
        """The error for rank ``rank``'s report, unless a peer died meanwhile: the survivors'
        collectives fail when a peer dies, and then the dead one is named."""
        sentinels = [p.sentinel for p in self.processes]
        multiprocessing.connection.wait(sentinels, timeout=_DEATH_GRACE_S)
        for other, proc in enumerate(self.processes):
            if other != rank and not proc.is_alive():
                return self._death_error(other, f"(rank {rank} then failed too)")
        return WorkerFailedError(f"tensor-parallel worker {report.rstrip()}", rank)

    def _check_heartbeats(self, what: str) -> None:
        now = time.monotonic()
        for rank, stamp in enumerate(self._heartbeats):
            if stamp and now - stamp > self.hang_timeout_s:
                pid = self.processes[rank].pid
                self._fail(WorkerFailedError(
                    f"tensor-parallel worker rank {rank} (pid {pid}) has not responded for "
                    f"{now - stamp:.0f} s during {what} (hung or stopped); the engine has "
                    f"stopped", rank))

    def _answer_waiting(self, rank: int) -> bool:
        """Whether ``rank``'s pipe holds an answer (or its end closed); never blocks."""
        try:
            return self._failure is not None or self._conns[rank].poll()
        except (EOFError, OSError):
            return True

    def _step_output(self) -> ModelRunnerOutput:
        """Rank 0's answer to the oldest step not read yet."""
        output = self._collect([0], "a step")[0]
        assert isinstance(output, ModelRunnerOutput)
        return output

    # ---------------------------------------------------------------------- Executor API
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> _RankZeroAnswer:
        """Sends the step to every rank once; the handle reads rank 0's output."""
        self._broadcast(("step", scheduler_output))
        return _RankZeroAnswer(self)

    def shutdown(self) -> None:
        """Stops and reaps every worker process; idempotent."""
        self._finalizer()


class _RankZeroAnswer:
    """The handle of a step sent to every rank: reads rank 0's answer (answers come in the
    order the steps were sent, so handles must be read in that order)."""

    def __init__(self, executor: MultiprocExecutor) -> None:
        self._executor = executor

    def result(self) -> ModelRunnerOutput:
        """Waits for rank 0's output of this step."""
        return self._executor._step_output()

    def ready(self) -> bool:
        """Whether rank 0's answer has arrived (or its pipe broke: ``result`` raises then)."""
        return self._executor._answer_waiting(0)
