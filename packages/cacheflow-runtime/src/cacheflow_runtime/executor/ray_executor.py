"""The Ray executor: one actor per tensor-parallel rank, in a placement group, across hosts.

It joins the running Ray cluster (``ray.init(address="auto")``, or ``RAY_ADDRESS``) and
starts a local one when none runs. A placement group reserves one bundle per rank (one GPU
each; one CPU each when the model runs on the CPU), packed onto as few hosts as possible; rank
0's host gives the address where the ranks meet. Each step's ``SchedulerOutput`` is put in
Ray's object store once and every actor reads it from there; only rank 0's result comes back.

Failures end the engine: an actor that dies fails the call naming its rank; an actor that stops
answering is noticed by pings (each actor runs a second thread for them), and one left
unanswered for ``hang_timeout_s`` (default 30 s, ``CACHEFLOW_WORKER_TIMEOUT_S``) fails the call
naming that rank. The clock starts at an actor's first answer: until then it may still be
starting (a new worker process importing torch, a runtime environment being set up), which the
multiprocess executor does not count either; an actor that dies while starting still fails the
call at once. ``shutdown`` (and a finalizer at exit) kills the actors, removes the placement
group, and stops the local Ray it started.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any, Optional

import torch

from cacheflow_runtime.config import CacheConfig, ModelConfig, SchedulerConfig
from cacheflow_runtime.core.step_data import ModelRunnerOutput, SchedulerOutput
from cacheflow_runtime.distributed.environment import get_ip, get_open_port
from cacheflow_runtime.executor.base import RankExecutor
from cacheflow_runtime.executor.handle import CompletedStep
from cacheflow_runtime.executor.multiproc import DEFAULT_HANG_TIMEOUT_S, ENV_WORKER_TIMEOUT
from cacheflow_runtime.executor.rank_worker import RankWorker, WorkerFailedError, WorkerSpec

logger = logging.getLogger(__name__)

# How long the placement group may wait for its bundles before the engine gives up.
PLACEMENT_TIMEOUT_S = 120.0
_POLL_S = 0.5
_PING_PERIOD_S = 1.0


class PingWatch:
    """The executor's outstanding pings: at most one per rank, and which ranks have answered
    one. A rank whose ping goes unanswered for ``timeout_s`` is hung, but only once it has
    answered before: an actor still in its constructor answers nothing, and that is not a hang.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.answered: set[int] = set()
        self.pending: dict[int, tuple[Any, float]] = {}

    def sent(self, rank: int, ref: Any, now: float) -> None:
        """Records a ping sent to ``rank`` at ``now``."""
        self.pending[rank] = (ref, now)

    def needs_ping(self, rank: int) -> bool:
        """Whether ``rank`` has no ping outstanding."""
        return rank not in self.pending

    def mark_answered(self, rank: int) -> None:
        """``rank`` answered something (a ping or a call): it is running."""
        self.answered.add(rank)

    def check(self, now: float, is_done: Any, resolve: Any) -> Optional[tuple[int, float]]:
        """Settles the pings that were answered (``is_done(ref)``; ``resolve(rank, ref)``
        raises if the actor died) and returns (rank, seconds) of a running rank whose ping has
        waited longer than the timeout, else None."""
        for rank, (ref, sent) in list(self.pending.items()):
            if is_done(ref):
                resolve(rank, ref)
                del self.pending[rank]
                self.mark_answered(rank)
            elif rank in self.answered and now - sent > self.timeout_s:
                return rank, now - sent
        return None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("distributed_executor_backend='ray' needs Ray: "
                          "pip install 'cacheflow-runtime[ray]'") from exc
    return ray


class RayWorkerActor:
    """The body of one rank's actor: a :class:`RankWorker` built on demand."""

    def __init__(self) -> None:
        self.worker: Optional[RankWorker] = None

    def rendezvous_address(self) -> str:
        """``tcp://<this host>:<free port>``: where the group meets (asked of rank 0)."""
        return f"tcp://{get_ip()}:{get_open_port()}"

    def ping(self) -> bool:
        """Answers at once (on the actor's second thread) while it is alive and not stuck."""
        return True

    def start(self, spec: WorkerSpec, rank: int) -> str:
        """Joins the group as ``rank`` and loads this rank's shard; returns the transport."""
        device = torch.device("cuda:0" if spec.device_type == "cuda" else "cpu")
        self.worker = RankWorker(spec, rank, device)
        return self.worker.backend()

    def call(self, method: str, *args: Any) -> Any:
        """Runs ``RankWorker.<method>(*args)``."""
        assert self.worker is not None, "start() must run first"
        return getattr(self.worker, method)(*args)


def _release(actors: list[Any], placement_group: Any, own_ray: bool) -> None:
    """Kills the actors, removes the placement group, stops a Ray this executor started."""
    ray = _import_ray()
    if not ray.is_initialized():
        return
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - the actor may be gone already
            pass
    if placement_group is not None:
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(placement_group)
        except Exception:  # noqa: BLE001
            pass
    if own_ray:
        ray.shutdown()


class RayExecutor(RankExecutor):
    """``world_size`` Ray actors, one per rank (a GPU each, or a CPU each for CPU models)."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, world_size: int, device_type: str,
                 seed: int = 0, enforce_eager: bool = False,
                 hang_timeout_s: Optional[float] = None) -> None:
        ray = self._ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.world_size = world_size
        self.hang_timeout_s = (float(os.environ.get(ENV_WORKER_TIMEOUT, DEFAULT_HANG_TIMEOUT_S))
                               if hang_timeout_s is None else hang_timeout_s)
        self._failure: Optional[WorkerFailedError] = None
        self._pings = PingWatch(self.hang_timeout_s)
        own_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
            except ConnectionError:
                ray.init()
                own_ray = True
        resource = "GPU" if device_type == "cuda" else "CPU"
        available = ray.cluster_resources().get(resource, 0)
        if available < world_size:
            if own_ray:
                ray.shutdown()
            raise ValueError(f"tensor_parallel_size={world_size} needs {world_size} {resource}s "
                             f"in the Ray cluster but it has {available:g}")
        bundle = {"GPU": 1, "CPU": 1} if resource == "GPU" else {"CPU": 1}
        self.placement_group = placement_group([dict(bundle) for _ in range(world_size)],
                                               strategy="PACK")
        self.actors: list[Any] = []
        self._finalizer = weakref.finalize(self, _release, self.actors, self.placement_group,
                                           own_ray)
        ready, _ = ray.wait([self.placement_group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self._finalizer()
            raise RuntimeError(f"Ray could not place {world_size} bundles of {bundle} within "
                               f"{PLACEMENT_TIMEOUT_S:.0f} s (ray status shows what is free)")
        actor_cls = ray.remote(RayWorkerActor)
        for rank in range(world_size):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self.placement_group, placement_group_bundle_index=rank)
            self.actors.append(actor_cls.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                max_concurrency=2, scheduling_strategy=strategy).remote())
        init_method = self._wait([self.actors[0].rendezvous_address.remote()], [0],
                                 "finding the rendezvous address")[0]
        spec = WorkerSpec(model_config, cache_config, scheduler_config, world_size,
                          init_method, device_type, seed, enforce_eager)
        refs = [actor.start.remote(spec, rank) for rank, actor in enumerate(self.actors)]
        self.backend = self._wait(refs, list(range(world_size)), "starting the workers")[0]
        logger.info("%d Ray actors, collectives over %s", world_size, self.backend)

    # ------------------------------------------------------------------------------- calls
    def _wait(self, refs: list[Any], ranks: list[int], what: str) -> list[Any]:
        """The results of ``refs`` (one per rank of ``ranks``); fails naming the rank whose actor
        died, raised, or stopped answering pings."""
        ray = self._ray
        if self._failure is not None:
            raise self._failure
        rank_of = {ref: rank for ref, rank in zip(refs, ranks)}
        results: dict[int, Any] = {}
        pending = list(refs)
        pings = self._pings
        last_ping = 0.0

        def resolve_ping(rank: int, ref: Any) -> None:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self._fail(WorkerFailedError(
                    f"tensor-parallel worker rank {rank} (Ray actor) died during {what}: "
                    f"{exc}; the engine has stopped", rank))

        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
            for ref in done:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self._fail(WorkerFailedError(
                        f"tensor-parallel worker rank {rank} (Ray actor) died during {what}: "
                        f"{exc}; the engine has stopped", rank))
                except ray.exceptions.RayTaskError as exc:
                    self._fail(WorkerFailedError(
                        f"tensor-parallel worker rank {rank} failed during {what}:\n{exc}", rank))
                pings.mark_answered(rank)
            now = time.monotonic()
            hung = pings.check(now, lambda ref: bool(ray.wait([ref], timeout=0)[0]),
                               resolve_ping)
            if hung is not None:
                rank, waited = hung
                self._fail(WorkerFailedError(
                    f"tensor-parallel worker rank {rank} (Ray actor) has not responded for "
                    f"{waited:.0f} s during {what} (hung or stopped); the engine has "
                    "stopped", rank))
            if pending and now - last_ping >= _PING_PERIOD_S:
                last_ping = now
                for rank, actor in enumerate(self.actors):
                    if pings.needs_ping(rank):
                        pings.sent(rank, actor.ping.remote(), now)
        return [results[r] for r in ranks]

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        refs = [actor.call.remote(method, *args) for actor in self.actors]
        return self._wait(refs, list(range(self.world_size)), method)

    # ---------------------------------------------------------------------- Executor API
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> CompletedStep:
        """Puts the step in the object store once; every actor runs it; rank 0's output.

        The step is waited for here: an actor runs two calls at once (pings beside steps), so
        two steps in flight could run out of order on it.
        """
        if self._failure is not None:
            raise self._failure
        step = self._ray.put(scheduler_output)
        refs = [actor.call.remote("execute_model", step) for actor in self.actors]
        output = self._wait(refs, list(range(self.world_size)), "a step")[0]
        assert isinstance(output, ModelRunnerOutput)
        return CompletedStep(output)

    def shutdown(self) -> None:
        """Kills the actors and frees their placement group; idempotent."""
        self._finalizer()
