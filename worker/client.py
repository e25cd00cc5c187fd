"""The low-level worker client: declare tensors, then push / pull / push_pull them by name, non-blocking.

Calls encode their tensors, send the messages and return a :class:`concurrent.futures.Future` at once. Layers,
each in its own module: :mod:`._engine` (the sockets and the requests in flight), :mod:`._messages` (building
messages from the sharding plan), :mod:`._replies` (what replies mean for the caller's tensors), :mod:`._shm` (the
same-host shared areas); this module is the public face that puts them together.

Delivery: a future resolves when every server involved answered. The server de-duplicates pushes on (worker,
step, key), so a push that reaches it twice is applied once. Every request has a deadline; a server that stays
silent, a reply naming an error, or a peer lost by the coordinator fails the future with a message saying which.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import torch
import zmq

from zps.protocol import board, transport
from zps.protocol.bodies import Commit, Hyperparameters, KeyStat, model_signature, read_inspect_reply
from zps.protocol.codecs import Codec, canonical_spec, codec_factory, make_codec
from zps.protocol.config import Config, ConfigError
from zps.protocol.messages import KeyEntry, Kind, Message
from zps.protocol.optim_spec import check_job_optimizer
from zps.protocol.peers import peer_name
from zps.protocol.plan import DEFAULT_CHUNK_BYTES, Chunk, ParamSpec, Plan, make_plan
from zps.protocol.rendezvous import RendezvousClient, Topology
from zps.protocol.replicas import live_copies, parse_notice, routes
from zps.protocol.shm import Segment
from zps.protocol.tensors import Decoders, encode_entry
from zps.telemetry.stepmetrics import MetricsFile
from zps.telemetry.trace import Tracer

from ._engine import Engine
from ._messages import Messages, Tensors, flat
from ._progress import Disturbance, Progress
from ._replies import Replies
from ._shm import Mark, SharedAreas

log = logging.getLogger("zps.worker")
JOIN_ROUNDS = 8  # a joiner's requests to be counted from one step (two agree; more means a server misbehaves)


class Client:
    """A worker's connection to the parameter servers.

    Build with :meth:`from_env` inside a process started by ``zps`` (or pass a :class:`Config`), then
    :meth:`declare` the tensors once. Names are the keys of the mappings given to push/pull.
    """

    def __init__(
        self,
        config: Config,
        context: zmq.Context | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        codec: str | None = None,
        pull_codec: str | None = None,
        error_feedback: bool | None = None,
        compress_min: int | None = None,
        shm: bool | None = None,
    ) -> None:
        """``codec``/``pull_codec``/``error_feedback``/``compress_min``/``shm`` default to the job's settings."""
        job = config.job
        self.config = config
        codec = job.codec if codec is None else codec
        pull = job.pull_codec if pull_codec is None else pull_codec
        error_feedback = job.error_feedback if error_feedback is None else error_feedback
        self.compress_min = job.compress_min if compress_min is None else compress_min
        # under --net every byte crosses the emulated links: the same-host shortcut would bypass them
        # (--replicas: a home's keys may move to another server, which has no shared areas for them)
        self.use_shm = (job.shm if shm is None else shm) and not job.net and not job.replicas
        try:  # a bad spec fails here, before the cluster is joined, not at the first push or pull
            self.push_factory = (codec_factory(codec, error_feedback=error_feedback)
                                 if codec and codec != "none" else None)
            self.pull_codec = canonical_spec(pull) if pull else None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._decoders = Decoders((codec or "", pull or ""))
        self.context = context or zmq.Context.instance()
        self.chunk_bytes = chunk_bytes
        self.rendezvous = RendezvousClient(config, self.context)
        try:
            self.topology: Topology = self.rendezvous.register()
        except BaseException:
            self.rendezvous.close()
            raise
        self.rank = self.topology.rank
        self.num_workers = self.topology.num_workers
        self.name = peer_name("worker", self.rank)
        self.plan: Plan | None = None
        self.start_step = 0  # set by declare()
        self._messages: Messages | None = None
        self._areas = SharedAreas(self.name)
        self._closed = False
        self.before_close: list[Callable[[], None]] = []  # run by a clean close() first (a checkpoint still due)
        self._replies = Replies(self._decoders, self._areas)
        self._dead: frozenset[int] = frozenset()  # --replicas: servers that died (their homes moved to backups)
        self.table_servers: set[int] = set()  # servers holding rows of an EmbeddingTable (each owes a checkpoint part)
        self._topology_version = 0
        self._engine = Engine(self.name, self.context, self.topology.servers, config.job.timeout, self._replies,
                              lambda: self.rendezvous.failure, config.secrets,
                              reroute=self._reroute if job.replicas else None,
                              lost=self.rendezvous.suspect if job.replicas else None)
        self.progress = Progress(Tracer(config.job.trace, "worker", self.rank),
                                 MetricsFile(config.job.metrics_out, "worker", self.rank),
                                 Disturbance(config.job, self.rank))
        self.progress.engine_bytes = lambda: (self._engine.sent_bytes, self._engine.recv_bytes)
        self._replies.tracer = self.progress.tracer
        self._replies.progress = self.progress
        self.rendezvous.reporter = self.progress.report

    @classmethod
    def from_env(cls, **kwargs: Any) -> Client:
        return cls(Config.from_env(), **kwargs)

    # -- declaration -----------------------------------------------------------------------------------
    def declare(
        self,
        tensors: Tensors,
        optimizer: tuple[str, list[dict[str, Any]]] | None = None,
        groups: Mapping[str, int] | None = None,
    ) -> None:
        """Declare every tensor once, in the same order on every worker; rank 0's values initialise the servers.

        ``optimizer`` is (torch.optim class name, hyper-parameters per group) for the servers to build (rank 0
        must pass it; when the job sets ``--optimizer`` it must be that one). ``groups`` maps a name to its group
        index (default 0). Returns once every key is initialised on every server (on a rank other than 0: once
        rank 0's values arrived, or fails after the job's timeout naming rank 0).
        """
        if self.plan is not None:
            raise RuntimeError(f"{self.name}: declare() was already called; declare every tensor in one call")
        with_values = self.rank == 0
        if with_values and optimizer is None:
            raise ValueError("rank 0 must pass the server optimizer to declare()")
        if optimizer is not None and self.config.job.optimizer:
            check_job_optimizer(optimizer, self.config.job.optimizer)
        groups = groups or {}
        plan = make_plan([ParamSpec(name, tuple(t.shape), 4) for name, t in tensors.items()],
                         self.topology.num_servers, self.chunk_bytes)
        group_of_param = [groups.get(spec.name, 0) for spec in plan.params]
        signature = model_signature([(spec.name, spec.shape, g) for spec, g in zip(plan.params, group_of_param,
                                                                                    strict=True)])
        parts: list[tuple[int, Message]] = []
        created: dict[int, tuple[Segment, list[tuple[int, int]]]] = {}
        replicas = self.config.job.replicas
        for server in self._live_servers():
            # with --replicas every live copy is declared (and gets rank 0's values): the home's and its backups'
            chunks = ([c for c in plan.chunks if server in live_copies(c.server, replicas, plan.num_servers,
                                                                        self._dead)]
                      if replicas else plan.chunks_on(server))
            shared = SharedAreas.create(chunks) if self.use_shm and chunks else None
            if shared is not None:
                created[server] = shared
            keys: list[KeyEntry] = []
            frames: list[Any] = []
            for i, chunk in enumerate(chunks):
                entry: KeyEntry = {"key": chunk.key, "name": chunk.name, "offset": chunk.offset, "numel": chunk.numel,
                                   "dtype": "float32", "group": group_of_param[chunk.param], "nf": 0}
                if replicas:
                    entry["home"] = chunk.server
                if shared is not None:
                    entry["shm"] = list(shared[1][i])
                if with_values:
                    values = flat(tensors[chunk.name])
                    fields, bufs = encode_entry(make_codec("none"), values[chunk.offset : chunk.offset + chunk.numel])
                    entry.update(fields)
                    frames.extend(bufs)
                keys.append(entry)
            body: dict[str, Any] = {"model": signature}
            if with_values and optimizer is not None:
                body.update(optimizer=optimizer[0], groups=optimizer[1])
            if shared is not None:
                body["shm"] = shared[0].describe()
            parts.append((server, Message(Kind.INIT, src=self.name, keys=keys, body=body, frames=frames)))
        try:
            replies = self._engine.submit(parts, "declare", keep_replies=True).result()
        finally:
            for segment, _ in created.values():
                segment.release()  # mapped by the server now (or not wanted): its descriptor is no longer needed
        # the step the job is at: 0; a replacement's (--on-worker-failure restart) or a resumed job's is later
        self.start_step = min((int(replies[s].get("step", 0)) for s in replies if plan.chunks_on(s)), default=0)
        if self.rank >= self.config.job.num_workers:
            self.start_step = self._join(self.start_step)
        for server, (segment, offsets) in created.items():
            if replies.get(server, {}).get("shm"):
                self._areas.adopt(server, segment, plan.chunks_on(server), offsets)
            else:
                log.info("%s: server %d cannot map shared memory (%s); using TCP frames", self.name, server,
                         replies.get(server, {}).get("why", "another host"))
                segment.close()
        self.plan = plan
        self._messages = Messages(self.name, plan, group_of_param, self.chunk_bytes, self.push_factory,
                                  self.pull_codec, self.compress_min, self._areas)

    def _join(self, step: int) -> int:
        """A worker beyond --workers (--max-workers): every server counts it from one step, the one returned. BSP:
        each answers the step it takes (later than asked when it aggregates that one already); asked again with the
        latest until all agree. ASP and SSP: its clock starts at the latest answer."""
        servers = self._live_servers()
        asked = []
        for _ in range(JOIN_ROUNDS):  # (two rounds agree: a server that took a step holds every later one back)
            asked.append(step)
            parts = [(s, Message(Kind.JOIN, src=self.name, body={"step": step})) for s in servers]
            replies = self._engine.submit(parts, "join", keep_replies=True).result()
            steps = {int(replies[s].get("step", step)) for s in servers}
            if steps == {step} or self.topology.mode != "bsp":
                log.warning("%s joins the running job at step %d", self.name, max(steps))
                return max(steps)
            step = max(steps)
        raise RuntimeError(f"{self.name} could not join the running job: the servers did not agree on a step to count "
                           f"it from in {JOIN_ROUNDS} rounds (asked {asked}, the last answers {sorted(steps)})")

    @property
    def checkpoint_requested(self) -> int:
        """The newest checkpoint worker 0 asked for, as the servers' replies said (0: none yet)."""
        return self._replies.checkpoint

    def chunks(self, name: str) -> list[Chunk]:
        """The chunks (keys, servers, slices) the declared tensor ``name`` is cut into."""
        return self._built().chunks(name)

    def _built(self) -> Messages:
        if self._messages is None:
            raise RuntimeError(f"{self.name}: call declare() before pushing or pulling")
        return self._messages

    # -- data calls ------------------------------------------------------------------------------------
    def push(self, grads: Mapping[str, torch.Tensor | None], step: int, lr: float | list[float] | None = None,
             checkpoint: int | None = None, *, hp: Hyperparameters | None = None, hold: bool = False) -> Future:
        """Push gradients of ``step`` (None: this worker has no gradient for that tensor in this step); resolves
        when every server acknowledged.

        ``lr``: the learning rate the update is applied with (one, or one per optimizer group; default: the declared
        optimizer's); ``hp``: instead, each group's hyper-parameters that differ from the declared optimizer's
        (:mod:`zps.protocol.bodies`; ``lr`` then only rescales error feedback); ``hold``: BSP, the servers keep the
        step's aggregate until a :meth:`pull` brings its commit. ``checkpoint`` (worker 0): ask for a checkpoint at
        that step (see :mod:`zps.protocol.checkpoint`)."""
        marks: set[Mark] = set()
        with self._unreserve_on_error(marks):
            began = time.perf_counter()
            with self.progress.tracer("encode", step=step):
                parts = self._built().push(Kind.PUSH, grads, step, marks, lr=lr, hp=hp, hold=hold,
                                           checkpoint=checkpoint)
            self.progress.encode_s += time.perf_counter() - began
            self._count(parts, grads, None)
            return self._engine.submit(parts, f"push of step {step}", marks=marks)

    def pull(self, outs: Tensors, step: int, *, commit: Commit | None = None) -> Future:
        """Pull values into ``outs`` (written in place, any device) as of ``step`` (BSP: after ``step`` updates);
        ``commit``: how the held step ``step - 1`` is applied (:mod:`zps.protocol.bodies`)."""
        marks: set[Mark] = set()
        with self._unreserve_on_error(marks):
            messages = self._built()
            parts = messages.pull(outs, step, marks, commit)
            self._count(parts, None, outs)
            return self._engine.submit(parts, f"pull of step {step}", messages.destinations(outs), marks=marks)

    def push_pull(self, grads: Mapping[str, torch.Tensor | None], outs: Tensors, step: int,
                  lr: float | list[float] | None = None, checkpoint: int | None = None, *,
                  hp: Hyperparameters | None = None) -> Future:
        """Push the gradients of ``step``, then pull the values of step ``step + 1`` into ``outs``; one round trip
        (arguments as :meth:`push`)."""
        if set(grads) != set(outs):
            raise ValueError("push_pull needs the same names in grads and outs")
        marks: set[Mark] = set()
        with self._unreserve_on_error(marks):
            messages = self._built()
            began = time.perf_counter()
            with self.progress.tracer("encode", step=step):
                parts = messages.push(Kind.PUSH_PULL, grads, step, marks, lr=lr, hp=hp, checkpoint=checkpoint)
            self.progress.encode_s += time.perf_counter() - began
            self._count(parts, grads, outs)
            return self._engine.submit(parts, f"push_pull of step {step}", messages.destinations(outs), marks=marks)

    def inspect(self, names: list[str], step: int, norm_type: float | None = None) -> Future:
        """BSP, a held step: resolves to each key's :class:`~zps.protocol.bodies.KeyStat` (its aggregate's
        ``norm_type``-norm, None without one or where no worker produced a gradient; whether it is finite), once
        every key's aggregate of ``step`` is complete."""
        parts = self._built().inspect(names, step, norm_type)
        asked = {s: {e["key"] for e in m.keys} for s, m in parts}
        done: Future = Future()

        def read(future: Future) -> None:
            try:
                replies = future.result()
                found: dict[int, KeyStat] = {}
                for server, keys in asked.items():
                    found.update(read_inspect_reply(replies[server], keys))
                done.set_result(found)
            except BaseException as exc:  # noqa: BLE001  the caller's future carries it
                done.set_exception(exc)

        self._engine.submit(parts, f"inspect of step {step}", keep_replies=True).add_done_callback(read)
        return done

    def _count(self, parts: list[tuple[int, Message]], grads: Mapping[str, torch.Tensor | None] | None,
               outs: Tensors | None) -> None:
        """Account a call's bytes: uncompressed (logical) and through the shared areas (the engine counts the
        sockets' bytes)."""
        progress, plan = self.progress, self._built().plan
        if grads is not None:
            progress.logical_sent += sum(4 * t.numel() for t in grads.values() if t is not None)
        if outs is not None:
            progress.logical_recv += sum(4 * t.numel() for t in outs.values())
        for _, msg in parts:
            progress.payload_sent += transport.size_of(msg.frames)
            for entry in msg.keys:
                if entry.get("shm"):  # (uncompressed: the codec's output is the tensor's bytes)
                    progress.shm_sent += 4 * plan.chunks[entry["key"]].numel
                    progress.payload_sent += 4 * plan.chunks[entry["key"]].numel
                if entry.get("pshm"):
                    progress.shm_recv += 4 * plan.chunks[entry["key"]].numel
                    progress.payload_recv += 4 * plan.chunks[entry["key"]].numel

    def broadcast(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        """Every worker calls it: rank 0's ``tensors`` (any dtype) are copied into every other worker's, bit for bit
        (through the first live server; ``name`` tells one broadcast from the next)."""
        server = self._live_servers()[0]
        if self.rank == 0:
            self._engine.submit([(server, board.put(self.name, name, tensors))], f"broadcast {name!r}").result()
            return
        replies = self._engine.submit([(server, board.get(self.name, name))], f"broadcast {name!r}",
                                      keep_messages=True).result()
        got_name, got = board.read_tensors(replies[server])
        if got_name != name or got.keys() != tensors.keys():
            raise RuntimeError(f"{self.name}: broadcast {name!r}: worker 0 sent {got_name!r} with "
                               f"{sorted(got)[:5]}, this worker expects {sorted(tensors)[:5]}")
        with torch.no_grad():
            for key, tensor in tensors.items():
                if got[key].shape != tensor.shape or got[key].dtype != tensor.dtype:
                    raise RuntimeError(f"{self.name}: broadcast {name!r}: {key!r} is {tuple(got[key].shape)} "
                                       f"{got[key].dtype} at worker 0, {tuple(tensor.shape)} {tensor.dtype} here")
                tensor.copy_(got[key])

    def stats(self) -> list[dict[str, Any]]:
        """Each live server's counters and consistency record, by server rank (with ``--replicas``, the dead ones
        left out)."""
        parts = [(s, Message(Kind.STATS, src=self.name)) for s in self._live_servers()]
        replies = self._engine.submit(parts, "stats", keep_replies=True).result()
        return [replies[s] for s in self._live_servers()]

    def _live_servers(self) -> list[int]:
        return [s for s in range(self.topology.num_servers) if s not in self._dead]

    def _reroute(self) -> list[int] | None:
        """The engine asks (holding the sockets): new routes, when the coordinator announced a failover."""
        newest = None
        notices = self.rendezvous.notices
        while notices:
            try:
                found = parse_notice(notices.popleft(), self.topology.num_servers)
            except ValueError as exc:
                log.error("%s: a malformed notice from the coordinator: %s", self.name, exc)
                continue
            if found is not None and found[0] > self._topology_version:
                newest = found
        if newest is None:
            return None
        self._topology_version, self._dead = newest
        return routes(self.config.job.replicas, self.topology.num_servers, self._dead)

    def barrier(self, name: str = "default") -> None:
        """Wait until every live worker reached the barrier ``name`` (fails after the job's timeout, naming who is
        missing)."""
        self.rendezvous.barrier(name)

    def leave(self, timeout: float | None = None) -> None:
        """Tell every server this worker is done, so BSP and SSP stop waiting for it."""
        parts = [(s, Message(Kind.LEAVE, src=self.name)) for s in self._live_servers()]
        self._engine.submit(parts, "leave").result(timeout=timeout)

    def codecs(self) -> dict[int, Codec]:
        """The push codecs built so far, by key (their error-feedback residuals are this worker's state)."""
        return self._built().codecs()

    def push_codec(self, key: int) -> Codec:
        """The push codec of ``key``, built on first use (one per key: codecs and error feedback keep state)."""
        messages = self._built()
        if not 0 <= key < len(messages.plan.chunks):
            raise KeyError(f"{self.name}: no key {key}; the plan has {len(messages.plan.chunks)}")
        return messages.codec(messages.plan.chunks[key])

    @contextlib.contextmanager
    def _unreserve_on_error(self, marks: set[Mark]) -> Iterator[None]:
        """A call that fails before its request is queued gives back the shared areas it reserved."""
        try:
            yield
        except BaseException:
            self._areas.release(marks)
            raise

    # -- shutdown --------------------------------------------------------------------------------------
    def close(self, failure: str | None = None) -> None:
        """End this worker's part in the job. Cleanly (``failure`` None): leave the servers, so nobody waits for
        it, and tell the coordinator it finished. With ``failure``: do not leave; tell the coordinator this worker
        failed and why (the job then fails naming it: a crash is never taken for a clean exit)."""
        if self._closed:
            return
        try:
            while failure is None and self.before_close:
                self.before_close.pop(0)()
            if failure is None and self.plan is not None and self.rendezvous.failure is None:
                try:
                    self.leave(timeout=5.0)  # best effort: a server that is gone cannot be waited for
                except Exception as exc:  # the servers may be gone already at the end of a failed job
                    log.warning("%s: leave failed: %s", self.name, exc)
        finally:
            self._closed = True
            self._engine.close()
            self._areas.close()
            try:
                self.progress.tracer.write()
            except OSError as exc:
                log.error("%s: the trace could not be written: %s", self.name, exc)
            self.progress.end()
            self.rendezvous.done(failure)
            self.rendezvous.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.close(None if exc is None else f"{type(exc).__name__}: {exc}")

