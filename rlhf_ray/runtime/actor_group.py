"""A role as N Ray actors: the data-parallel ranks of one `torch.distributed` group.

    group = ActorGroup(ReferenceWorker, role="reference", num_ranks=2, num_cpus_per_rank=1)
    group.call(lambda actor: actor.setup.remote(job, init_from=path))             # same call on every rank
    refs = group.scatter(lambda actor, shard: actor.token_logps.remote(shard), batch)  # rank r gets shard r
    ref_logps = concat_shards(group.gather(refs))                                 # back in rank order
    group.shutdown()

Remote methods are called as methods (`actor.token_logps.remote(...)`), never by a
string name. `map` and `scatter` return one ObjectRef per rank, in rank order,
without waiting; pass refs on to other actors, or `gather` them. `call` is
`gather(map(...))`; `scatter_padded` takes a batch of any size (padded to a
multiple of the ranks) and returns a `Pending` whose `merged()` is the rows
back in order, padding dropped. Every wait of a driver on a group goes through
`gather`, which names the role and rank that failed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray
import torch
from ray.exceptions import RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_ray.runtime.distributed import find_free_port, get_node_ip
from rlhf_ray.runtime.placement import RankPlacement, RoleResources, check_fits, create_placement_group, plan_placement

Batch = dict[str, Any]


class ActorGroupError(RuntimeError):
    """A rank of a group failed to start or raised in a call; the message names the role and rank.

    The message's first line says it all in one line (`<where> failed in <Class.method> (<what it was
    doing>): <exception type>: <its message>`); the lines after it are the remote traceback.
    `where` is the failed call's description ("role 'critic' rank 0 of 1"); `died` says why, when the
    failure is an actor's death (killed, out of memory, its node lost) rather than an error it raised
    (`actor_death`); `reason` is the first line's part after "failed"."""

    def __init__(self, message: str, where: str = "", died: str | None = None, reason: str = ""):
        super().__init__(message)
        self.where = where
        self.died = died
        self.reason = reason

    def __reduce__(self):  # keep `where`, `died` and `reason` when Ray ships the error from an actor to the driver
        return type(self), (str(self), self.where, self.died, self.reason)


# Ray's errors for an actor that is gone (as opposed to one whose method raised).
DEATH_ERRORS = ("ActorDiedError", "ActorUnavailableError", "NodeDiedError", "WorkerCrashedError",
                "OutOfMemoryError", "ObjectLostError", "OwnerDiedError")


def actor_death(err: BaseException) -> str | None:
    """A one-line cause when `err` (or what it wraps) is an actor's death, else None.

    Walks the exception chain and Ray's `cause`; a death reported inside another actor's call (the
    policy waiting on an engine that died) is recognised by the error's name in the message."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ActorGroupError) and e.died:
            return e.died
        name = type(e).__name__
        text = str(e)
        for death in DEATH_ERRORS:
            if death in name or f"{death}:" in text or (death == "ActorDiedError" and "actor died" in text):
                first = next((line.strip() for line in text.splitlines() if line.strip()), name)
                return f"{death}: {first[:300]}"
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


_REMOTE_CALL = re.compile(r"ray::([\w.]+)")


def failure_reason(err: BaseException, died: str | None = None) -> str:
    """What a failed remote call reports after "failed", in one line: ` in <Class.method> (<notes the
    raising code added: what it was doing>): <type>: <first line of its message>`, or `: <death>` when
    the actor died. A call that failed waiting on another actor reports that actor's reason."""
    if died:
        return f": {died}"
    cause = getattr(err, "cause", None)
    if isinstance(cause, ActorGroupError) and cause.reason:
        return cause.reason
    raised = cause if isinstance(cause, BaseException) else err
    match = _REMOTE_CALL.search(getattr(err, "proctitle", "") or "") or _REMOTE_CALL.search(str(err)[:500])
    method = f" in {match.group(1)}" if match else ""
    notes = "; ".join(" ".join(str(n).split()) for n in getattr(raised, "__notes__", ()))
    doing = f" ({notes})" if notes else ""
    first = next((line.strip() for line in str(raised).splitlines() if line.strip()), "")
    return f"{method}{doing}: {type(raised).__name__}" + (f": {first}" if first else "")


def split_batch(batch: Batch, num_shards: int, role: str = "the group") -> list[Batch]:
    """Split a dict of tensors / lists along dim 0 into `num_shards` contiguous, equal shards.

    Shard r holds rows `[r * n, (r + 1) * n)` with `n = batch_size / num_shards`.
    Tensor shards are copies, so sending one to an actor ships only its rows
    (a view would carry the whole batch's storage)."""
    if not batch:
        raise ValueError(f"cannot scatter an empty batch to {role}")
    sizes = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            sizes[key] = value.shape[0]
        elif isinstance(value, (list, tuple)):
            sizes[key] = len(value)
        else:
            raise TypeError(f"batch[{key!r}] is a {type(value).__name__}; scatter splits per-example tensors and "
                            "lists only: pass constants as a separate argument of the remote call")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k}: {n}" for k, n in sizes.items())
        raise ValueError(f"batch fields differ in length along dim 0 ({listed}); every field needs one row per example")
    size = next(iter(sizes.values()))
    if size % num_shards:
        raise ValueError(f"a batch of {size} examples cannot be split evenly across the {num_shards} ranks of "
                         f"{role}: make the batch size a multiple of {num_shards}")
    n = size // num_shards
    shards = []
    for r in range(num_shards):
        shard = {}
        for key, value in batch.items():
            rows = value[r * n:(r + 1) * n]
            shard[key] = rows.clone() if isinstance(rows, torch.Tensor) else rows
        shards.append(shard)
    return shards


def concat_shards(results: Sequence[Any]) -> Any:
    """Join per-rank results in rank order along dim 0: a list of dicts of tensors /
    lists becomes one dict, a list of tensors one tensor."""
    if not results:
        raise ValueError("concat_shards got no results")
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(results))
    if not isinstance(first, dict):
        raise TypeError(f"concat_shards joins dicts of tensors/lists or tensors; rank 0 returned a "
                        f"{type(first).__name__}")
    merged = {}
    for key, value in first.items():
        for rank, result in enumerate(results):
            if not isinstance(result, dict) or key not in result:
                raise KeyError(f"rank {rank}'s result has no key {key!r} that rank 0's has")
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            merged[key] = torch.cat([result[key] for result in results])
        elif isinstance(value, (list, tuple)):
            merged[key] = [item for result in results for item in result[key]]
        else:
            raise TypeError(f"result[{key!r}] is a {type(value).__name__}, not a per-example tensor or list; "
                            "reduce such values (e.g. average metrics) per rank instead of concatenating")
    return merged


def pad_to_multiple(batch: Batch, multiple: int) -> tuple[Batch, int]:
    """Repeat the last row until the batch divides by `multiple`; returns (batch, real size)."""
    size = len(next(v for v in batch.values() if isinstance(v, (torch.Tensor, list))))
    extra = (-size) % multiple
    if not extra:
        return batch, size
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.cat([value, value[-1:].expand(extra, *value.shape[1:])])
        elif isinstance(value, list):
            out[key] = value + [value[-1]] * extra
        else:
            out[key] = value
    return out, size


@dataclass
class Pending:
    """Calls launched on every rank of a group over a padded batch (`ActorGroup.scatter_padded`)."""

    group: "ActorGroup"
    refs: list
    size: int
    """Rows of the batch before padding."""

    def results(self) -> list:
        """Each rank's result, in rank order (waits; names the rank that failed)."""
        return self.group.gather(self.refs)

    def merged(self) -> Any:
        """The ranks' results joined in rank order (`concat_shards`), the padding's rows dropped: the
        first `size` rows, one per row of the batch."""
        merged = concat_shards(self.results())
        if isinstance(merged, torch.Tensor):
            return merged[:self.size]
        return {k: v[:self.size] for k, v in merged.items()}


def wait_all(refs: Sequence[Any], describe: Callable[[int], str] = lambda index: f"call {index}") -> list:
    """The results of `refs`, in order: the one place a driver or worker waits on Ray calls.

    Raises `ActorGroupError` with `describe(index)` of the first call to fail, as
    soon as it fails, rather than waiting on calls that may be blocked in a
    collective with it."""
    refs = list(refs)
    results: list = [None] * len(refs)
    positions: dict = {}
    for index, ref in enumerate(refs):
        positions.setdefault(ref, []).append(index)
    pending = list(positions)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            value = ray.get(ready[0])
        except RayError as err:
            where = describe(positions[ready[0]][0])
            inner = getattr(err, "cause", None)
            if isinstance(inner, ActorGroupError) and inner.where:  # the call failed waiting on another actor
                where = f"{inner.where} (waited on by {where})"
            died = actor_death(err)
            reason = failure_reason(err, died)
            raise ActorGroupError(f"{where} failed{reason}\n{err}", where=where, died=died, reason=reason) from err
        for index in positions[ready[0]]:
            results[index] = value
    return results


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """Run inside rank 0's bundle: that node's IP and a free port on it."""
    return get_node_ip(), find_free_port()


class ActorGroup:
    """`num_ranks` actors of `worker_cls` (a `DistributedWorker` subclass) forming one process group.

    Each actor is built as `worker_cls(rank, world_size, master_addr,
    master_port, num_threads, *worker_args, **worker_kwargs)`, with
    `num_threads = max(1, int(num_cpus_per_rank))`.

    `placement`: rank r's `RankPlacement` at index r (from
    `create_placement_group(...).for_role(role)`), whose shares the actors ask
    Ray for. Without it the group reserves a placement group of its own
    (`num_ranks` bundles of `num_cpus_per_rank` CPUs and `num_gpus_per_rank`
    GPUs, checked to fit first) and removes it on `shutdown`.

    The constructor returns once every rank has joined the group; if a rank
    fails to start, all are stopped and `ActorGroupError` names the role and
    rank. `start_timeout_s` bounds the wait for the group's own placement and
    for the ranks (a start takes seconds; the default leaves room for a busy
    cluster). With `wait=False` it returns once the actors are created, and
    `wait_started()` waits for them: several groups then start at once (each
    rank's process start and imports take seconds; one group after another
    they add up).
    """

    def __init__(self, worker_cls: type, *, role: str, num_ranks: int, num_cpus_per_rank: float,
                 num_gpus_per_rank: float = 0, placement: Sequence[RankPlacement] | None = None,
                 worker_args: Sequence[Any] = (), worker_kwargs: dict | None = None,
                 runtime_env: dict | None = None, start_timeout_s: float = 600.0, wait: bool = True):
        self.role = role
        self._actors: list = []
        self._own_placement = None
        self._starting: tuple[list, float, float] | None = None  # (pings, timeout, deadline) until `wait_started`
        if placement is None:
            plan = plan_placement([RoleResources(role, num_ranks, num_cpus_per_rank, num_gpus_per_rank)])
            check_fits(plan)
            self._own_placement = create_placement_group(plan, timeout_s=start_timeout_s)
            placement = self._own_placement.for_role(role)
        if len(placement) != num_ranks:
            raise ValueError(f"role {role!r}: placement has {len(placement)} slots for num_ranks={num_ranks}; "
                             "build it from the same RoleResources")
        try:
            self._start(worker_cls, placement, max(1, int(num_cpus_per_rank)), tuple(worker_args),
                        dict(worker_kwargs or {}), runtime_env, start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        if wait:
            self.wait_started()

    def _start(self, worker_cls, placement, num_threads, args, kwargs, runtime_env, timeout_s) -> None:
        actor_cls = worker_cls if isinstance(worker_cls, ray.actor.ActorClass) else ray.remote(worker_cls)
        strategy = [PlacementGroupSchedulingStrategy(placement_group=p.placement_group,
                                                     placement_group_bundle_index=p.bundle_index)
                    for p in placement]
        world_size = len(placement)
        if world_size == 1:  # a group of one hosts its own rendezvous (`DistributedWorker`: port 0)
            master_addr, master_port = "127.0.0.1", 0
        else:
            master_addr, master_port = ray.get(_rendezvous_address.options(scheduling_strategy=strategy[0]).remote())
        for rank, slot in enumerate(placement):
            options = {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus, "scheduling_strategy": strategy[rank]}
            if runtime_env is not None:
                options["runtime_env"] = runtime_env
            self._actors.append(actor_cls.options(**options).remote(
                rank, world_size, master_addr, master_port, num_threads, *args, **kwargs))
        self._starting = ([actor.ping.remote() for actor in self._actors], timeout_s, time.monotonic() + timeout_s)

    def wait_started(self) -> None:
        """Wait for every rank's constructor, reporting the first that fails (the group is then stopped);
        a no-op once the group has started."""
        if self._starting is None:
            return
        try:
            self._wait_started(*self._starting)
        except BaseException:
            self.shutdown()
            raise
        self._starting = None

    def _wait_started(self, pings: list, timeout_s: float, deadline: float) -> None:
        rank_of = {ref: rank for rank, ref in enumerate(pings)}
        pending = list(pings)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = sorted(rank_of[ref] for ref in pending)
                raise ActorGroupError(
                    f"role {self.role!r}: ranks {ranks} of {len(pings)} did not start within {timeout_s:g} s (a rank "
                    "waits for all others to join torch.distributed; check the actors' logs, or raise start_timeout_s)")
            try:
                ray.get(ready[0])
            except RayError as err:
                raise ActorGroupError(f"role {self.role!r} rank {rank_of[ready[0]]} of {len(pings)} failed to "
                                      f"start:\n{err}") from err

    def __len__(self) -> int:
        return len(self._actors)

    @property
    def actors(self) -> list:
        """The actor handles, rank r at index r."""
        return list(self._actors)

    @property
    def rank0(self):
        """Rank 0's actor handle (for calls only one rank should make)."""
        return self._actors[0]

    def map(self, fn: Callable[[Any], Any]) -> list:
        """`[fn(actor) for each rank]`: the same remote call on every rank, e.g.
        `group.map(lambda actor: actor.set_seed.remote(7))`; returns the refs in rank order."""
        return [fn(actor) for actor in self._actors]

    def scatter(self, fn: Callable[[Any, Batch], Any], batch: Batch) -> list:
        """Split `batch` into `len(self)` equal contiguous shards (`split_batch`) and
        call `fn(actor, shard)` on each rank; returns the refs in rank order."""
        shards = split_batch(batch, len(self._actors), role=f"role {self.role!r}")
        return [fn(actor, shard) for actor, shard in zip(self._actors, shards)]

    def scatter_padded(self, fn: Callable[[Any, Batch], Any], batch: Batch) -> Pending:
        """`scatter` over a batch of any size: the last row repeated up to a multiple of the ranks.
        Returns at once; `Pending.merged()` waits and drops the padding."""
        padded, size = pad_to_multiple(batch, len(self._actors))
        return Pending(self, self.scatter(fn, padded), size)

    def call(self, fn: Callable[[Any], Any]) -> list:
        """`gather(map(fn))`: the same call on every rank, waited for; the results in rank order."""
        return self.gather(self.map(fn))

    def call_scattered(self, fn: Callable[[Any, Batch], Any], batch: Batch) -> list:
        """`gather(scatter(fn, batch))`: each rank's result on its shard, waited for, in rank order."""
        return self.gather(self.scatter(fn, batch))

    def call_rank0(self, fn: Callable[[Any], Any]) -> Any:
        """`fn(rank 0's actor)`, waited for (a call only one rank should make)."""
        return self.gather([fn(self.rank0)])[0]

    def gather(self, refs: Sequence[Any]) -> list:
        """The results of `refs` (rank r's at index r, as `map`/`scatter` return them).

        Raises `ActorGroupError` naming the rank as soon as one call fails, rather
        than waiting on ranks that may be blocked in a collective with it."""
        return wait_all(refs, lambda index: f"role {self.role!r} rank {index} of {len(self._actors)}")

    def shutdown(self, timeout_s: float = 15.0) -> None:
        """Stop every rank and release the group's own placement group. Safe to call twice.

        A rank whose class has a `shutdown()` method (a vLLM engine: its engine core, process groups and
        the folders it wrote under the temp directory) runs it first; the ranks are killed once all have
        returned, or after `timeout_s` (a rank stuck in a collective with a dead peer never returns)."""
        actors, self._actors = self._actors, []
        closing = []
        for actor in actors:
            try:
                closing.append(actor.shutdown.remote())
            except AttributeError:  # the class has no shutdown of its own
                continue
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=timeout_s)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if self._own_placement is not None:
            self._own_placement.remove()
            self._own_placement = None

    def __enter__(self) -> "ActorGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
