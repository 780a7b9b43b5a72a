"""`cli.py serve --ray [ADDRESS]`: engines as Ray actors across a cluster, placed and restarted by Ray.

The frontend connects to a Ray cluster (or starts a local one) and keeps engine actors on it: one
per GPU on every node with GPUs, `--engines-per-node N` on every node, or `--engines K` CPU engines
spread over the cluster. A reconcile loop gives nodes that join later their engines. Each actor runs
the ordinary `cli.py engine --frontend tcp://HEAD_IP:PORT` as its child process, with the run's
secret in its environment, so the engine attaches by the usual hello/welcome handshake over
CurveZMQ, exactly as one started by hand on another machine would.

An actor lives exactly as long as its engine process: when the child exits (kill -9, a crash, the
frontend dropping it), the actor's process exits too and Ray restarts it on the same node (at most
`--max-restarts` times), which starts a new engine under the same id. The frontend learns of the
loss at once from the actor call that waits on the child (no need to wait for missed heartbeats),
turns the engine's requests into explicit errors (or moves those with no token yet), and admits the
new engine when it says hello. The engine process dies with its actor (PR_SET_PDEATHSIG), so a
killed actor or a lost frontend (Ray kills the actors of a driver that is gone) leaves nothing.

Ray is an optional extra: this module imports it only when `--ray` is used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipc.ports import free_port_pair

log = logging.getLogger("kiln.frontend")

INSTALL_HINT = "pip install -e .[ray]"
POLL_S = 0.5
RECONCILE_EVERY_S = 5.0  # how often the frontend looks for nodes that joined (or left) the cluster
STOP_GRACE_S = 10.0  # SIGTERM to an engine process, then SIGKILL
ACTOR_EXIT_DELAY_S = 0.5  # after the child exits: time for the answer to wait_child to leave the actor
LOCAL_OBJECT_STORE_BYTES = 100 * 1024 * 1024  # engines pass nothing through Ray's object store
REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD_EXIT_FILE = "KILN_RAY_CHILD"


class RayUnavailable(Exception):
    pass


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--ray needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


@dataclass
class RayOptions:
    """What `serve --ray` was asked for. address None: start a local Ray cluster for this run."""

    address: str | None = None
    engines: int | None = None  # K CPU engines in the whole cluster
    engines_per_node: int | None = None  # on every node (GPU nodes: at most one per GPU)
    model: str | None = None  # as the user named it; each node resolves it itself (None: the embedded default)
    engine_args: list[str] = field(default_factory=list)  # plan flags for `cli.py engine`
    started_local: bool = False
    frontend_address: str = ""  # tcp://HEAD_IP:PORT that the engines dial
    gpu_mode: bool = False


# ---- connecting ------------------------------------------------------------------------------


def overrides_as_flags(overrides) -> list[str]:
    """PlanOverrides (flags and env vars already resolved here) as `cli.py engine` flags, so every node
    plans with what the frontend was told, whatever its own environment says."""
    flags = []
    for name in (
        "dtype",
        "quantization",
        "max_batch",
        "max_context",
        "kv_cache_tokens",
        "gpu_memory_fraction",
        "gpu_layers",
    ):
        value = getattr(overrides, name, None)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    for name in ("cpu_offload", "compile", "prefix_caching"):
        value = getattr(overrides, name, None)
        if value is not None:
            flags.append(("--" if value else "--no-") + name.replace("_", "-"))
    return flags


def connect(config) -> str | None:
    """Join (or start) the Ray cluster and fill in the engine socket the actors dial: on this node's
    cluster address, a free port pair unless --engine-port chose one. Returns a problem (one line) or None."""
    try:
        ray = import_ray()
    except RayUnavailable as exc:
        return str(exc)
    options: RayOptions = config.ray
    started = time.monotonic()
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING)
    if options.address is None:
        # a cluster of our own for this run, sized for what it must place (Ray's CPUs are logical)
        needed = max(options.engines or 0, options.engines_per_node or 0, os.cpu_count() or 1)
        kwargs.update(address="local", num_cpus=needed, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        options.started_local = True
    else:
        kwargs.update(address=options.address)
    try:
        ray.init(**kwargs)
    except Exception as exc:
        options.started_local = False
        where = options.address or "a local cluster"
        return f"cannot connect to Ray at {where}: {' '.join(str(exc).split())[:300]}"
    head_ip = ray.util.get_node_ip_address()
    log.info(
        "connected to Ray (%s) in %.1f s; this node is %s",
        "local cluster" if options.started_local else options.address,
        time.monotonic() - started,
        head_ip,
    )
    config.engine_host = head_ip
    if config.engine_port is None:
        config.engine_port = free_port_pair(head_ip)
    options.frontend_address = f"tcp://{head_ip}:{config.engine_port}"
    options.gpu_mode = options.engines is None and ray.cluster_resources().get("GPU", 0) > 0
    return None


def disconnect(options: RayOptions) -> None:
    ray = import_ray()
    if ray.is_initialized():
        ray.shutdown()  # a local cluster started for this run stops with it


# ---- the actor -------------------------------------------------------------------------------


def die_with_parent() -> None:
    """In the engine process, before exec: SIGKILL when the actor's thread that started it dies, so no
    engine outlives its actor (Ray kills actors with SIGKILL, which nothing can catch)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the engine then lives until its frontend's heartbeat checks drop it
        pass


class EngineActor:
    """One engine process on one Ray node, kept by a Ray actor. Ray restarts the actor (and so the
    engine) when it exits; `stop()` ends both for good."""

    def __init__(self, spec: dict):
        import ray

        self.spec = spec
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.node = f"{self.node_ip} (ray node {self.node_id[:8]})"
        self.stopping = False
        self.exited = threading.Event()
        self.exit_code: int | None = None
        self.child: subprocess.Popen | None = None
        started = threading.Event()
        # the thread that starts the engine also waits on it: PDEATHSIG follows the starting thread
        threading.Thread(target=self._keep, args=(started,), name="kiln-engine-keeper", daemon=True).start()
        started.wait()

    def _command(self) -> list[str]:
        spec = self.spec
        cli = Path(__file__).resolve().parent.parent / "cli.py"  # this node's kiln
        device = ["--gpu", "0"] if spec["gpu"] else ["--cpu"]  # Ray's CUDA_VISIBLE_DEVICES holds our one GPU
        model = ["--model", spec["model"]] if spec["model"] else []
        return [
            sys.executable,
            str(cli),
            "engine",
            *device,
            "--frontend",
            spec["frontend"],
            "--engine-id",
            spec["engine_id"],
            *model,
            *spec["engine_args"],
        ]

    def _keep(self, started: threading.Event) -> None:
        env = {**os.environ, **self.spec["env"], "KILN_NODE": self.node}  # the secret travels in env, not argv
        try:
            self.child = subprocess.Popen(self._command(), env=env, cwd=str(REPO_ROOT), preexec_fn=die_with_parent)
        finally:
            started.set()
        code = self.child.wait()
        self.exit_code = code
        self.exited.set()
        if not self.stopping:
            time.sleep(ACTOR_EXIT_DELAY_S)
            if not self.stopping:
                os._exit(1)  # Ray restarts this actor: a new engine process, a new handshake

    def describe(self) -> dict:
        return {"node": self.node, "node_id": self.node_id, "pid": self.child.pid if self.child else None}

    def wait_child(self) -> str:
        """Returns once the engine process has exited: how it ended."""
        self.exited.wait()
        pid = self.child.pid if self.child else None
        return f"engine process {pid} on {self.node} exited with code {self.exit_code}"

    def kill_child(self, pid: int) -> None:
        """The frontend dropped this engine (silent, hung, failing): end it so Ray starts a fresh one.
        Only the process named: a newer one under the same engine id stays."""
        child = self.child
        if child is None or child.pid != pid or child.poll() is not None:
            return
        child.terminate()
        threading.Timer(STOP_GRACE_S, lambda: child.poll() is None and child.kill()).start()

    def prepare_stop(self) -> None:
        self.stopping = True  # the engine's coming exit (the frontend's Shutdown) is no failure

    def stop(self) -> int | None:
        self.stopping = True
        child = self.child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return child.returncode if child else None


# ---- the frontend's side ----------------------------------------------------------------------


@dataclass(eq=False)
class RayEngine:
    """The frontend's record of one engine actor. `process`, `restart_at`, `started_at`, `last_loss` and
    `ever_ready` read like the local supervisor's ChildEngine (the server's waiting lines use them)."""

    engine_id: str
    node_id: str | None  # the node it is pinned to; None: Ray chooses (--engines K)
    actor: Any = None
    process: Any = None  # the actor while it is believed to run, else None
    started_at: float = 0.0
    ever_ready: bool = False
    restarts: int = 0
    restart_at: float | None = None  # Ray restarts at once; never set
    last_loss: str = ""
    node: str = ""
    pid: int | None = None  # the engine process the frontend last saw
    watcher: asyncio.Task | None = None
    gone: bool = False  # dead for good (node lost, restarts used up, never started)


class RaySupervisor:
    """Keeps the engine actors: creates them (and, as nodes join, more), watches each one's engine
    process, and tells the engine client at once when one is lost. Same face as EngineSupervisor."""

    def __init__(self, client, config, overrides):
        self.ray = import_ray()
        self.client = client
        self.options: RayOptions = config.ray
        self.secret = config.secret
        self.max_restarts = config.max_restarts
        self.engine_args = self.options.engine_args or overrides_as_flags(overrides)
        self.children: dict[str, RayEngine] = {}
        self.gave_up: str | None = None
        self.changed = asyncio.Event()
        self.stopping = False
        self.stopped = False
        self._actor_class = None
        self._next_index: dict[str, int] = {}
        self._broken: set[str] = set()  # id prefixes (nodes) whose engines could not start: not retried

    # -- placement --

    def actor_class(self):
        if self._actor_class is None:
            self._actor_class = self.ray.remote(EngineActor)
        return self._actor_class

    def spec(self, engine_id: str, gpu: bool) -> dict:
        env = {"KILN_SECRET": self.secret}
        for name in ("KILN_DEBUG", "KILN_FAULT_INJECTION", "HF_HUB_OFFLINE", "HF_HOME"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        return {
            "engine_id": engine_id,
            "gpu": gpu,
            "frontend": self.options.frontend_address,
            "model": self.options.model,
            "engine_args": self.engine_args,
            "env": env,
        }

    def create(self, engine_id: str, node_id: str | None, gpu: bool) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False) if node_id else "SPREAD"
        resources = {"num_gpus": 1, "num_cpus": 0} if gpu else {"num_cpus": 1}
        actor = (
            self.actor_class()
            .options(
                max_restarts=self.max_restarts,
                max_concurrency=4,
                scheduling_strategy=strategy,
                **resources,
            )
            .remote(self.spec(engine_id, gpu))
        )
        engine = RayEngine(engine_id, node_id, actor=actor, process=actor, started_at=time.monotonic())
        self.children[engine_id] = engine
        engine.watcher = asyncio.create_task(self._watch(engine))
        log.info(
            "engine actor %s placed%s (%s)",
            engine_id,
            f" on ray node {node_id[:8]}" if node_id else "",
            "1 GPU" if gpu else "1 CPU",
        )

    def wanted(self, nodes: list[dict]) -> list[tuple[str, str | None, bool, int]]:
        """(engine id prefix, node id or None, gpu, how many) for the cluster as it is now."""
        if self.options.engines is not None and self.options.engines_per_node is None:
            return [("ray-engine", None, False, self.options.engines)]
        plan = []
        for node in nodes:
            gpus = int(node.get("Resources", {}).get("GPU", 0))
            if self.options.gpu_mode:
                count = min(gpus, self.options.engines_per_node or gpus)
            else:
                count = self.options.engines_per_node or 1
            if count:
                plan.append((f"ray-{node['NodeID'][:8]}", node["NodeID"], self.options.gpu_mode, count))
        return plan

    def reconcile(self, nodes: list[dict]) -> None:
        alive = {node["NodeID"] for node in nodes}
        for engine in list(self.children.values()):  # engines of nodes that left: gone with them
            if engine.node_id is not None and engine.node_id not in alive and not engine.gone:
                self._forget(engine, "its Ray node left the cluster")
        for prefix, node_id, gpu, count in self.wanted(nodes):
            if prefix in self._broken:
                continue
            have = [e for e in self.children.values() if e.engine_id.startswith(prefix + "-") and not e.gone]
            for _ in range(count - len(have)):
                index = self._next_index.get(prefix, 0)
                self._next_index[prefix] = index + 1
                self.create(f"{prefix}-{index}", node_id, gpu)

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def start_all(self) -> None:
        self.reconcile(self.alive_nodes())
        if not self.children:
            self.gave_up = "no node of the Ray cluster can hold an engine" + (
                " (no GPUs; pass --engines K for CPU engines)" if self.options.gpu_mode else ""
            )
            self.changed.set()

    # -- liveness --

    async def _watch(self, engine: RayEngine) -> None:
        """Wait on the actor's engine process; on its loss tell the client at once; then follow Ray's
        restart (the next call waits for the restarted actor) or notice that the actor is gone for good."""
        ray = self.ray
        lost_pid = None
        while not self.stopping:
            try:
                described = await engine.actor.describe.remote()
                if lost_pid is not None and described["pid"] == lost_pid:  # the old actor, about to exit
                    await asyncio.sleep(0.2)
                    continue
                engine.node, engine.pid, engine.process = described["node"], described["pid"], engine.actor
                lost_pid = engine.pid
                why = await engine.actor.wait_child.remote()
            except ray.exceptions.ActorUnavailableError as exc:  # restarting: the next call waits for it
                why = f"engine actor lost ({first_line(exc)})"
            except ray.exceptions.RayActorError as exc:  # dead for good
                if not self.stopping:
                    self._actor_died(engine, first_line(exc))
                return
            except asyncio.CancelledError:
                raise
            if self.stopping:
                return
            self._lost(engine, why)
            if engine.gone:
                return

    def _lost(self, engine: RayEngine, why: str) -> None:
        engine.process = None
        engine.last_loss = why
        handle = self.client.engines.get(engine.engine_id)
        engine.ever_ready = engine.ever_ready or (handle is not None and handle.ready)
        if handle is not None and handle.hello.pid == engine.pid:
            self.client.engine_lost(engine.engine_id, why)  # explicit errors for its requests, now
        if not engine.ever_ready:
            # it never served: a configuration error (model, memory), not something a restart fixes
            self._forget(engine, why, kill=True)
            self._broken.add(engine.engine_id.rpartition("-")[0])
            self.client.failures.append(f"engine {engine.engine_id}: {why}")
            if all(not e.ever_ready for e in self.children.values()) and all(e.gone for e in self.children.values()):
                self.changed.set()
            return
        engine.restarts += 1
        log.warning(
            "engine %s lost (%s); Ray restarts its actor (restart %d of at most %d)",
            engine.engine_id,
            why,
            engine.restarts,
            self.max_restarts,
        )

    def _actor_died(self, engine: RayEngine, why: str) -> None:
        if engine.gone:  # forgotten already (its node left, or it never started)
            return
        engine.process = None
        if engine.engine_id in self.client.engines:
            self.client.engine_lost(engine.engine_id, f"engine actor died: {why}")
        node_alive = engine.node_id is None or any(n["NodeID"] == engine.node_id for n in self.alive_nodes())
        if not node_alive:
            self._forget(engine, "its Ray node left the cluster")
            return
        self._forget(engine, why)
        if engine.ever_ready:
            self.gave_up = (
                f"engine {engine.engine_id} was lost more than --max-restarts ({self.max_restarts}) "
                f"times (last: {engine.last_loss or why})"
            )
            log.error("giving up: %s", self.gave_up)
            self.changed.set()

    def _forget(self, engine: RayEngine, why: str, kill: bool = False) -> None:
        log.warning("engine %s is gone for good: %s", engine.engine_id, why)
        engine.gone, engine.process = True, None
        engine.last_loss = engine.last_loss or why
        self.children.pop(engine.engine_id, None)
        if kill:
            try:
                self.ray.kill(engine.actor, no_restart=True)
            except Exception:
                pass

    def on_engine_lost(self, engine_id: str, why: str, was_ready: bool = False) -> None:
        """The client dropped an engine (silence, a hang, failing steps, or a restarted one replacing it).
        If that process still runs, end it: its actor then exits and Ray restarts both."""
        engine = self.children.get(engine_id)
        if engine is None or self.stopping:
            return
        engine.ever_ready = engine.ever_ready or was_ready
        engine.last_loss = why
        if engine.pid is not None and not why.startswith("replaced by"):
            engine.actor.kill_child.remote(engine.pid)

    async def watch(self) -> None:
        """The server's watcher task: reconcile with the cluster's nodes until cancelled (the server stops);
        then tell the actors that the engines' coming exits are no failure."""
        try:
            self.start_all()
            last_reconcile = time.monotonic()
            while True:
                for engine in self.children.values():
                    handle = self.client.engines.get(engine.engine_id)
                    if handle is not None and handle.ready:
                        engine.ever_ready, engine.last_loss, engine.pid = True, "", handle.hello.pid
                await asyncio.sleep(POLL_S)
                if not self.stopping and time.monotonic() - last_reconcile >= RECONCILE_EVERY_S:
                    nodes = await asyncio.to_thread(self.alive_nodes)
                    self.reconcile(nodes)
                    last_reconcile = time.monotonic()
        except asyncio.CancelledError:
            self.prepare_stop()
            raise

    def prepare_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for engine in self.children.values():
            if engine.watcher is not None:
                engine.watcher.cancel()
        refs = [engine.actor.prepare_stop.remote() for engine in self.children.values()]
        try:
            self.ray.wait(refs, num_returns=len(refs), timeout=5)
        except Exception:
            pass

    def never_started(self) -> bool:
        return all(not e.ever_ready for e in self.children.values())

    def restarting(self) -> dict[str, dict]:
        status = {}
        for engine in self.children.values():
            handle = self.client.engines.get(engine.engine_id)
            if engine.ever_ready and engine.last_loss and not (handle is not None and handle.ready):
                status[engine.engine_id] = {
                    "reason": engine.last_loss,
                    "restarts": engine.restarts,
                    "max_restarts": self.max_restarts,
                    "node": engine.node,
                }
        return status

    def stop_all(self, timeout: float) -> None:
        """Stop every engine (SIGTERM, then SIGKILL), kill the actors, leave the cluster (and stop a local one)."""
        if self.stopped:
            return
        self.stopped = True
        self.stopping = True
        ray = self.ray
        actors = [engine.actor for engine in self.children.values()]
        try:
            refs = [actor.stop.remote() for actor in actors]
            ray.wait(refs, num_returns=len(refs), timeout=timeout + STOP_GRACE_S)
        except Exception as exc:
            log.warning("stopping engine actors: %s", first_line(exc))
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.children.clear()
        disconnect(self.options)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
