"""``--cluster``: build on any node, time on the device. Ray runs the work; this module says what.

- Every branch of a recipe (every candidate of ``compress tune``) is a Ray task on any node with a
  CPU: its passes (through the pass cache), then its targets' engines. compress tune's screen (each
  engine's drop on validation images, no timing) is one more task; only what it keeps is timed. The main chain runs and builds
  in the calling process meanwhile. A task's engines and pass outputs come back whole, by Ray's object
  store, and are written into the run's staging directory only there (nothing half-written).
- Each device's timing session (every engine for that device and the source, interleaved rounds, as in
  one process) is one Ray actor that asks for the resource ``device:NAME``: it runs only on a node
  that carries it (``ray start --resources='{"device:jetson-orin": 1}'``), and with one unit per node,
  one session per node at a time. Sessions run one after another, after every build has finished, so
  nothing of this command runs beside a timing session. Every row names the node it ran on.
- Faults: a worker that dies mid-build is retried once by Ray (``max_retries=1``), then that
  branch's targets fail with one line each and the run goes on; an actor whose node disappears fails
  its rows with one line each; a device no node carries fails its rows, saying how to add one.

Where the process is connected to Ray already (the Python API's caller ran ``ray.init``), that
connection is used and left as it was. Otherwise ``--cluster auto`` joins the cluster this machine belongs to (``ray start`` ran here) or, where there
is none, starts a local Ray instance for the command (its CPUs, and the resources ``device:host`` and
``device:PROFILE`` of this machine) and stops it at the end. ``--cluster ADDRESS``: ``HOST:PORT`` of
a head node's GCS, or ``ray://HOST:PORT`` (Ray Client). Every node needs compressor and the same
library versions (the engines are the same bytes only with the same converters), and the data at the
same path (or a shared directory).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import CompressorError, ConfigError, first_line

log = logging.getLogger(__name__)

CLUSTER_EXTRA = "pip install 'compressor[cluster]' (Ray)"
KILL_ENV = "COMPRESSOR_CLUSTER_KILL"
"""fault injection for tests: ``BRANCH:N`` kills (SIGKILL) the worker building BRANCH on its first N
attempts; Ray retries a dead worker's task once, so N=1 is survived and N=2 fails the branch"""
RETRIES = 1


def resource(device: str) -> str:
    """The Ray custom resource a node carries to time engines for ``device``."""
    return f"device:{device}"


def reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to ``HOST:PORT`` (or ``ray://HOST:PORT``) opens within ``timeout``."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _current_cluster() -> str | None:
    """The GCS address ``ray start`` recorded on this machine (what ``address="auto"`` joins), if any."""
    try:
        from ray._private.utils import read_ray_address  # Ray's own reader (RAY_TMPDIR and all)

        return read_ray_address() or None
    except Exception:  # noqa: BLE001 - a private helper that moved: the default place
        path = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        return path.read_text().strip() or None if path.is_file() else None


# ---------------------------------------------------------------------- moving files
def pack(root: Path, files: list[Path] | None = None) -> dict[str, bytes]:
    """Files under ``root`` (or only ``files``) as {path relative to root: bytes}."""
    root = Path(root)
    chosen = files if files is not None else [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(Path(f).relative_to(root)): Path(f).read_bytes() for f in chosen}


def unpack(files: dict[str, bytes], root: Path) -> list[Path]:
    out = []
    for rel, data in files.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out.append(path)
    return out


def pack_artifact(artifact: Any, work: Path) -> dict[str, bytes]:
    """A ModelArtifact as the pass cache stores it (ModelArtifact.save), packed."""
    work.mkdir(parents=True, exist_ok=True)
    artifact.save(work)
    return pack(work)


def engine_files(engine: Any) -> list[Path]:
    """Every file of an engine's directory (its model files, engine.json, a build script), once."""
    files = {Path(f) for f in engine.files}
    files |= {p for p in Path(engine.path).parent.rglob("*") if p.is_file()}
    return sorted(files)


def unpack_artifact(files: dict[str, bytes], where: Path) -> Any:
    from .artifact import ModelArtifact

    unpack(files, where)
    return ModelArtifact.load(where)


def relocate(value: Any, old: str, new: str) -> Any:
    """``value`` (JSON-like) with every string under ``old`` moved under ``new``."""
    if isinstance(value, str):
        return new + value[len(old):] if value.startswith(old) else value
    if isinstance(value, dict):
        return {k: relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, old, new) for v in value]
    return value


def where_am_i(device: str | None = None) -> dict[str, Any]:
    """The node and worker process this runs in (the ``timed_on`` of a row, the ``ran_on`` of a stage)."""
    from .environment import cpu_model

    out: dict[str, Any] = {"node": socket.gethostname(), "pid": os.getpid(), "cpu": cpu_model(), "nice": os.nice(0)}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            out.update(node_id=ctx.get_node_id()[:12], ip=ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - outside Ray: the host name says it
        pass
    if device is not None:
        out["device"] = device
    return out


def normal_priority() -> int:
    """Ray starts its workers at nice 15 (so that its own processes stay responsive): a timing session at
    15 lost to anything else on the node (TFLite INT8 read 1.45x slower there than in one process). Back
    to 0 where the node allows it (root, or CAP_SYS_NICE); the session's rows then say the niceness
    they were timed at. Applies to this thread and those it starts after (the runtimes' pools)."""
    if os.nice(0) > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:
            log.warning("timing session at nice %d: the node does not allow raising it back to 0", os.nice(0))
    return os.nice(0)


def _stage(name: str, started: float, **extra: Any) -> dict[str, Any]:
    return {"stage": name, **where_am_i(), "seconds": round(time.time() - started, 2),
            "started": round(started, 2), **extra}


def _maybe_die(branch: str, spec: str, marks: str) -> None:
    """KILL_ENV fault injection (see there; read on the caller): a marker file per attempt in
    ``marks`` counts them."""
    name, _, times = spec.partition(":")
    if name != branch:
        return
    done = len(list(Path(marks).glob(f"kill-{branch}-*")))
    if done < int(times or 1):
        Path(marks, f"kill-{branch}-{done}").touch()
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------- worker side
def build_branch_task(payload: dict[str, Any], main_files: dict[str, bytes],
                      source_files: dict[str, bytes] | None) -> dict[str, Any]:
    """One branch on a worker: its passes and engines in a directory of its own, returned packed.
    ``main_files``, ``source_files``: the main chain's output and the run's input, packed (top-level
    arguments, so that Ray resolves their object references)."""
    from .pipeline import Pipeline

    started = time.time()
    b = payload["branch"]
    if payload["kill"]:
        _maybe_die(b.name, payload["kill"], payload["marks"])
    if payload["deadline"] is not None and started > payload["deadline"]:
        return {"skipped": True, "stage": _stage(f"build {b.name}", started, skipped=True)}
    from .staging import run_tempdir

    with run_tempdir(), tempfile.TemporaryDirectory(prefix="compressor-branch-") as d:
        work = Path(d)
        main = unpack_artifact(main_files, work / "main")
        source = main if source_files is None else unpack_artifact(source_files, work / "source")
        pipe = Pipeline([], [], cache=payload["cache"], seed=payload["seed"], device=payload["device"])
        out = work / "out"
        res = pipe.build_branch(b, main, source, payload["data"], out, payload["threads"])
        engines = [{"name": e.name, "target": e.target, "step": e.builder.step if e.builder else None,
                    "precision": e.precision, "built": e.built, "info": relocate(e.info, str(out), "{OUT}"),
                    "files": [str(Path(f).relative_to(out)) for f in e.files], "data": pack(out, engine_files(e))}
                   for e in res.engines]
        artifacts = [pack_artifact(a, work / f"artifact-{i}") for i, a in enumerate(res.artifacts)]
        return {"records": res.records, "artifacts": artifacts, "engines": engines, "failures": res.failures,
                "stage": _stage(f"build {b.name}", started, passes=len(res.records), engines=len(engines))}


def _engines_from(payloads: list[dict[str, Any]], out: Path) -> list[Any]:
    """Engines sent by :meth:`Cluster._engine_payload`, their files written under ``out``."""
    from .target_base import Engine

    engines = []
    for e in payloads:
        unpack(e["data"], out)
        engines.append(Engine(e["target"], e["name"], [out / f for f in e["files"]], e["precision"],
                              relocate(e["info"], "{OUT}", str(out)), built=e["built"], builder=e["builder"]))
    return engines


def screen_task(payload: dict[str, Any], source_files: dict[str, bytes]) -> dict[str, Any]:
    """compress tune's screen (validation accuracy, no timing) on any worker: which engines go on to the
    device's timing session, and the screen's findings."""
    from .measure import session_rows
    from .records import RunResult
    from .staging import run_tempdir

    started = time.time()
    with run_tempdir(), tempfile.TemporaryDirectory(prefix="compressor-screen-") as d:
        source = unpack_artifact(source_files, Path(d) / "source")
        result = RunResult(source=source, artifacts=[source], records=[], threads=payload["threads"])
        result.engines = _engines_from(payload["engines"], Path(d) / "run")
        rows, _ = session_rows(result, payload["cfg"], payload["threads"])
        screen = payload["screen"]
        screen.data_ref.append(payload["data"])
        try:
            kept = {r.name for r in screen(rows, result)}
        finally:
            for r in rows:
                r.runner.close()
    state = {k: v for k, v in vars(screen).items() if k != "data_ref"}
    names = [e.name for e in result.engines
             if e.name in kept or any(k.startswith(e.name + "-proxy-") for k in kept)]
    return {"kept": names, "failures": result.failures, "screen": state,
            "stage": _stage(f"screen {len(result.engines)} engine(s)", started)}


class TimingSession:
    """A device's timing session, as a Ray actor on a node that carries ``device:NAME``: it receives
    the engines (files packed), measures them with the source in one session (measure.measure_run)
    and keeps them for later sessions of the same command (compress tune's thread sweep)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.dir = Path(tempfile.mkdtemp(prefix="compressor-session-"))
        self.engines: dict[str, Any] = {}
        self.nice = normal_priority()

    def where(self) -> dict[str, Any]:
        return where_am_i(self.device)

    def measure(self, payload: dict[str, Any]) -> dict[str, Any]:
        from .hooks import HookList
        from .measure import measure_run
        from .records import RunResult
        from .staging import run_tempdir

        started = time.time()
        with run_tempdir():
            source = unpack_artifact(payload["source"], self.dir / "source")
            result = RunResult(source=source, artifacts=[source], records=[], threads=payload["threads"])
            out = self.dir / "run"
            for engine in _engines_from(payload["engines"], out):
                self.engines[engine.name] = engine
                result.engines.append(engine)
            measure_run(payload["data"], payload["cfg"], payload["threads"], result, hooks=HookList([]),
                        timed_on=where_am_i(self.device), source_name=payload["source_name"])
        for m in result.measurements:
            m.engine = relocate(m.engine, str(out), "{OUT}")
        return {"measurements": result.measurements, "failures": result.failures, "timing_load": result.timing_load,
                "timing": result.timing,
                "stage": _stage(f"time {len(payload['engines'])} engine(s) for {self.device}", started)}

    def p50_at_threads(self, names: list[str], counts: list[int], one: Any, cfg: Any) -> tuple[Any, Any, dict]:
        """measure.p50_at_threads of the named engines, here."""
        from .measure import p50_at_threads

        started = time.time()
        loaders = {n: (lambda t, e=self.engines[n]: e.builder.load(e, threads=t)) for n in names}
        p50, load = p50_at_threads(loaders, counts, one, cfg)
        return p50, load, _stage(f"thread sweep of {len(names)} engine(s) for {self.device}", started)


# ---------------------------------------------------------------------- caller side
@dataclass
class _Submitted:
    branch: Any
    ref: Any


class Cluster:
    """A Ray cluster for one command: ``with Cluster("auto") as c: pipeline.cluster = c; ...``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.started_local = False
        self.stages: list[dict[str, Any]] = []
        self.sessions: dict[str, Any] = {}
        self.session_nodes: dict[str, dict[str, Any]] = {}
        self.ray: Any = None
        self.joined_existing = False

    def __enter__(self) -> Cluster:
        try:
            import ray
        except ImportError:
            raise ConfigError(f"--cluster needs Ray, which is not installed: {CLUSTER_EXTRA}") from None
        self.ray = ray
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False, "configure_logging": True}
        self.joined_existing = ray.is_initialized()
        if self.joined_existing:  # the Python API's caller connected already: use it, leave it running
            return self
        if self.address == "auto":
            try:
                current = _current_cluster()  # a stale record of a cluster that is gone: start one
                if current is not None and not reachable(current):
                    raise ConnectionError(current)
                ray.init(address="auto", **quiet)
            except ConnectionError:  # no cluster here: one for this command
                from .devices import host_device

                ray.init(resources={resource("host"): 1, resource(host_device().name): 1},
                         include_dashboard=False, **quiet)
                self.started_local = True
        else:
            if not reachable(self.address):  # Ray itself would keep trying for minutes
                raise ConfigError(f"--cluster {self.address}: nothing answers there (start the head with "
                                  f"`ray start --head`, or give its HOST:PORT)")
            try:
                ray.init(address=self.address, **quiet)
            except Exception as exc:  # noqa: BLE001 - Ray raises several kinds for an address it cannot reach
                raise ConfigError(f"--cluster {self.address}: cannot join the cluster: {first_line(exc)}") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        for actor in self.sessions.values():
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - its node may be gone already
                pass
        self.sessions.clear()
        if not self.joined_existing:
            self.ray.shutdown()

    # ------------------------------------------------------------------ builds
    def submit_branches(self, pipeline: Any, artifact: Any, source: Any, data: Any, threads: int,
                        tmp: Path) -> list[_Submitted]:
        """Every branch of ``pipeline`` as a task (retried once where its worker dies)."""
        ray = self.ray
        task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(build_branch_task)
        main = ray.put(pack_artifact(artifact, tmp / "cluster-main"))
        src = None if source is artifact else ray.put(pack_artifact(source, tmp / "cluster-source"))
        lean = None if data is None else replace(data, _cache={})
        marks = tmp / "cluster-faults"
        marks.mkdir(exist_ok=True)
        wall_deadline = None
        if pipeline.deadline is not None:  # monotonic here; workers read the wall clock
            wall_deadline = time.time() + (pipeline.deadline - time.monotonic())
        out = []
        for b in pipeline.branches:
            payload = {"branch": b, "data": lean, "cache": pipeline.cache,
                       "seed": pipeline.seed, "device": pipeline.branch_device(b), "threads": threads,
                       "deadline": wall_deadline, "kill": os.environ.get(KILL_ENV, ""), "marks": str(marks)}
            out.append(_Submitted(b, task.remote(payload, main, src)))
        pipeline.hooks.on_message(f"cluster: {len(out)} branch(es) submitted as tasks")
        return out

    def gather_branches(self, pipeline: Any, submitted: list[_Submitted], result: Any, out_dir: Path,
                        tmp: Path) -> None:
        """Each branch's outcome into ``result``, in the recipe's order: pass records and outputs,
        engines (files written into ``out_dir``), failures; a branch whose worker died twice fails
        its targets with one line each."""
        from .target_base import Engine

        ray = self.ray
        for s in submitted:
            b = s.branch
            try:
                got = ray.get(s.ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
                if isinstance(cause, CompressorError):
                    raise cause from None  # as in one process: the pass's own error ends the run
                self._fail_branch(result, b, f"its task failed: {first_line(cause or exc)}")
                continue
            except ray.exceptions.RayError as exc:  # the worker (or its node) died, and again on the retry
                self._fail_branch(result, b, f"its worker died twice (retried {RETRIES}x): {first_line(exc)}")
                continue
            self.stages.append(got["stage"])
            if got.get("skipped"):
                result.skipped_branches.append(b.name)
                continue
            for i, (record, files) in enumerate(zip(got["records"], got["artifacts"])):
                result.records.append(replace(record, index=len(result.records)))
                result.artifacts.append(unpack_artifact(files, tmp / f"cluster-{b.name}-{i}"))
            targets = {t.step: t for t in b.targets}
            for e in got["engines"]:
                files = unpack(e["data"], out_dir)
                builder = targets.get(e["step"])
                if builder is not None:
                    builder.device = pipeline.branch_device(b)
                engine = Engine(e["target"], e["name"], [out_dir / f for f in e["files"]], e["precision"],
                                relocate(e["info"], "{OUT}", str(out_dir)), built=e["built"], builder=builder)
                assert {str(p) for p in engine.files} <= {str(p) for p in files}
                result.engines.append(engine)
            result.failures.extend(got["failures"])  # with the not-built ones, as _build_target records them
            st = got["stage"]
            pipeline.hooks.on_message(f"cluster: branch {b.name} built on {st['node']} (pid {st['pid']}) "
                                      f"in {st['seconds']:.1f} s")

    @staticmethod
    def _fail_branch(result: Any, b: Any, why: str) -> None:
        from .records import TargetFailure

        for t in b.targets:
            result.failures.append(TargetFailure(t.name, t.step, f"branch {b.name}: {why}", unavailable=False))

    # ------------------------------------------------------------------ timing
    def session(self, device: str) -> Any:
        """The timing actor for ``device`` (made once per command), or a one-line reason it cannot be."""
        if device in self.sessions:
            return self.sessions[device]
        wanted = resource(device)
        if wanted not in self.ray.cluster_resources():
            return (f"no node of the cluster carries the resource {wanted!r}: start one on the device with "
                    f"`ray start --address=HEAD:6379 --resources='{{\"{wanted}\": 1}}'`")
        actor_cls = self.ray.remote(num_cpus=0, resources={wanted: 1}, max_restarts=0)(TimingSession)
        actor = actor_cls.remote(device)
        self.sessions[device] = actor
        return actor

    def measure(self, pipeline: Any, data: Any, cfg: Any, threads: int, result: Any, out_dir: Path) -> None:
        """One session per device, one after another: the run's device first (its source row is
        ``source``; another device's is ``source@DEVICE``). Rows of a device no node carries, or whose
        node disappears, fail with one line each."""
        from .records import TargetFailure

        ray = self.ray
        by_device: dict[str, list[Any]] = {pipeline.device_request: []}
        branch_of = {f"{b.name}-": b for b in pipeline.branches}
        for e in result.engines:
            b = next((b for prefix, b in branch_of.items() if e.name.startswith(prefix)), None)
            by_device.setdefault(b.device if b is not None and b.device else pipeline.device_request, []).append(e)
        src = pack_artifact(result.source, Path(result._tmp.name) / "cluster-session-source")
        lean = replace(data, _cache={})
        first = True
        result.sessions = []
        for device, engines in by_device.items():
            if not engines and not first:
                continue
            if first and pipeline.screen is not None and engines:
                engines = self._screen(pipeline, engines, src, lean, cfg, threads, result, out_dir)
            actor = self.session(device)
            payload = {"source": src, "data": lean, "cfg": cfg, "threads": threads,
                       "source_name": "source" if first else f"source@{device}",
                       "engines": [self._engine_payload(e, out_dir) for e in engines]}
            try:
                if isinstance(actor, str):
                    raise LookupError(actor)
                pipeline.hooks.on_message(f"cluster: timing {len(engines)} engine(s) for {device}")
                got = ray.get(actor.measure.remote(payload))
            except (LookupError, ray.exceptions.RayError) as exc:
                why = str(exc) if isinstance(exc, LookupError) else (
                    f"the node timing device {device} disappeared: {first_line(exc)}")
                for e in engines:
                    step = e.builder.step if e.builder else e.name
                    result.failures.append(TargetFailure(e.builder.name if e.builder else e.target, step,
                                                         f"engine {e.name!r} was not timed: {why}", unavailable=False))
                self.sessions.pop(device, None)
                first = False
                continue
            self.stages.append(got["stage"])
            for m in got["measurements"]:
                m.engine = relocate(m.engine, "{OUT}", str(out_dir))
                result.measurements.append(m)
            result.failures.extend(got["failures"])
            if first:
                result.timing_load, result.timing = got["timing_load"], got["timing"]
            st = got["stage"]
            self.session_nodes[device] = {k: st[k] for k in ("node", "pid", "cpu", "node_id", "ip", "nice") if k in st}
            result.sessions.append({"device": device, **self.session_nodes[device], "seconds": st["seconds"],
                                    "engines": [e.name for e in engines], "load": got["timing_load"]})
            first = False
        result.cluster = self.summary()

    def _screen(self, pipeline: Any, engines: list[Any], src: dict[str, bytes], data: Any, cfg: Any, threads: int,
                result: Any, out_dir: Path) -> list[Any]:
        """compress tune's screen as a task on any worker (retried once where it dies): the engines it
        keeps for the device's session; its findings go back into ``pipeline.screen``. Where it cannot
        run, every engine fails with one line."""
        from .records import TargetFailure

        ray = self.ray
        screen = copy.copy(pipeline.screen)
        screen.data_ref = []
        payload = {"engines": [self._engine_payload(e, out_dir) for e in engines], "screen": screen, "data": data,
                   "cfg": cfg, "threads": threads}
        task = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(screen_task)
        pipeline.hooks.on_message(f"cluster: screening {len(engines)} engine(s) on validation images")
        try:
            got = ray.get(task.remote(payload, src))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
            if isinstance(cause, CompressorError):
                raise cause from None
            why = f"the screen failed: {first_line(cause or exc)}"
        except ray.exceptions.RayError as exc:
            why = f"the screen's worker died twice (retried {RETRIES}x): {first_line(exc)}"
        else:
            self.stages.append(got["stage"])
            result.failures.extend(got["failures"])
            for k, v in got["screen"].items():
                setattr(pipeline.screen, k, v)
            kept = set(got["kept"])
            return [e for e in engines if e.name in kept]
        for e in engines:
            result.failures.append(TargetFailure(e.builder.name if e.builder else e.target,
                                                 e.builder.step if e.builder else e.name,
                                                 f"engine {e.name!r} was not screened: {why}", unavailable=False))
        return []

    @staticmethod
    def _engine_payload(e: Any, root: Path) -> dict[str, Any]:
        return {"name": e.name, "target": e.target, "precision": e.precision, "built": e.built,
                "builder": e.builder, "info": relocate(e.info, str(root), "{OUT}"),
                "files": [str(Path(f).relative_to(root)) for f in e.files], "data": pack(root, engine_files(e))}

    def p50_at_threads(self, device: str, names: list[str], counts: list[int], one: Any, cfg: Any) -> tuple[Any, Any]:
        """compress tune's thread sweep, in the device's session (which holds the engines already)."""
        actor = self.session(device)
        if isinstance(actor, str):
            raise ConfigError(actor)
        p50, load, stage = self.ray.get(actor.p50_at_threads.remote(names, counts, one, cfg))
        self.stages.append(stage)
        return p50, load

    def summary(self) -> dict[str, Any]:
        """What the report says of the cluster: where it was, its nodes, and where each stage ran."""
        nodes = []
        try:
            for n in self.ray.nodes():
                if n.get("Alive"):
                    nodes.append({"node_id": n["NodeID"][:12], "ip": n.get("NodeManagerAddress"),
                                  "cpus": n.get("Resources", {}).get("CPU"),
                                  "devices": sorted(k[len("device:"):] for k in n.get("Resources", {})
                                                    if k.startswith("device:"))})
        except Exception:  # noqa: BLE001 - a summary without the node list is still a summary
            pass
        return {"address": self.address, "started_local": self.started_local, "nodes": nodes,
                "stages": list(self.stages), "sessions": dict(self.session_nodes)}
