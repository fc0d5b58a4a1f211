"""The pass manager: checks a pipeline's chain of forms, runs its passes in order with caching
(:mod:`compressor.pass_cache`) and hooks, builds each target's engine, and measures the source model
and every engine (:mod:`compressor.measure`)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .artifact import Form, ModelArtifact, quantized_input
from .data import DataBundle
from .devices import Device, or_host
from .errors import CompressorError, DataError, PassError, PipelineOrderError, TargetError, TargetUnavailable, first_line
from .environment import default_threads
from .evaluate import EvaluationConfig, ResultRow
from .hooks import Hook, HookList
from .measure import measure_run, timed_here
from .pass_cache import PassCache
from .staging import run_scratch
from .config import require_data
from .pass_base import Pass, PassContext
from .records import PassRecord, RunResult, TargetFailure
from .registry import get_pass
from .target_base import Target

log = logging.getLogger(__name__)


def check_chain(passes: Sequence[Pass], targets: Sequence[Target], input_form: Form, *,
                quantized_by: str | None = None) -> list[Form]:
    """Walk the forms through every pass and into every target before anything runs.

    A chain quantizes once: a pass that ``quantizes`` after another one (``quantized_by``: the
    step of a quantizing pass before this chain, e.g. in the main chain of a branch) is refused,
    since INT8 PTQ or QAT of an already quantized model gives an invalid or meaningless graph."""
    forms = [input_form]
    for p in passes:
        if p.quantizes:
            if quantized_by is not None:
                raise PipelineOrderError(
                    f"{p.step}: the model is already quantized by {quantized_by}; a model is quantized "
                    f"once: keep one of the two steps"
                )
            quantized_by = p.step
        forms.append(p.check_input(forms[-1], p.step))
    for t in targets:
        conversion_for(forms[-1], t)  # raises where the target cannot be reached
    return forms


CONVERSIONS: dict[Form, str] = {Form.ONNX: "export_onnx"}
"""the pass that gives each form a target may ask for; the pass manager inserts it before the target"""


def conversion_for(form: Form, target: Target) -> Pass | None:
    """The conversion pass (default config) that turns ``form`` into one ``target`` takes; None where
    the target takes ``form`` itself. Raises the target's order error where no conversion leads there."""
    if form in target.consumes:
        return None
    for wanted in sorted(target.consumes, key=lambda f: f.value):
        name = CONVERSIONS.get(wanted)
        if name is not None:
            conversion = get_pass(name)(step=f"{target.step} <- {name}")
            if conversion.accepts(form) and conversion.output_form(form) is wanted:
                return conversion
    target.check_input(form, target.step)  # raises, naming what the target takes
    raise AssertionError("unreachable")


def quantizing_step(passes: Sequence[Pass]) -> str | None:
    """The step of the last pass in ``passes`` that quantizes the model, if any."""
    return next((p.step for p in reversed(passes) if p.quantizes), None)


def assign_engine_names(chains: Sequence[tuple[ModelArtifact, Sequence[Target], str]]) -> dict[int, str]:
    """One unique engine name per target (keyed by ``id(target)``): ``prefix + engine_name``, and
    where two targets of the run would get the same name (e.g. two onnxruntime targets with
    different configs), ``-2``, ``-3``, ... on the later ones in recipe order. Computed from the
    artifacts alone, before any engine is built, so the names do not depend on which build fails."""
    names: dict[int, str] = {}
    seen: dict[str, int] = {}
    for artifact, targets, prefix in chains:
        for t in targets:
            base = prefix + t.engine_name(artifact)
            seen[base] = seen.get(base, 0) + 1
            names[id(t)] = base if seen[base] == 1 else f"{base}-{seen[base]}"
    return names


@dataclass
class BranchSpec:
    """A side chain: passes from the main chain's output, then targets; engines named ``name-...``.
    ``device``: where its engines are timed on a cluster (a device name; None: the recipe's device)."""

    name: str
    passes: list[Pass]
    targets: list[Target]
    device: str | None = None


class Pipeline:
    """An ordered list of passes and the targets that take the last pass's output.

    >>> pipe = Pipeline([Fuse(), QuantizePTQ(backend="openvino")], targets=[OpenVINOTarget()])
    >>> result = pipe.run(artifact, data=data, out_dir=Path("out"))
    >>> result.measurements[1].top1
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        targets: Sequence[Target] = (),
        *,
        baselines: Sequence[Target] = (),
        branches: Sequence[BranchSpec] = (),
        hooks: Sequence[Hook] = (),
        cache: PassCache | None = None,
        seed: int = 0,
        device: Device | None = None,
        device_request: str | None = None,
    ) -> None:
        self.device = or_host(device)
        """the device the engines are for: it decides device-dependent settings (devices.py)"""
        self.screen: Callable[[list[ResultRow], RunResult], list[ResultRow]] | None = None
        """called with every row before measuring; returns the rows to measure (compress tune drops
        candidates that miss the accuracy budget on validation images before any timing)"""
        self.deadline: float | None = None
        """time.monotonic() after which no further branch starts (compress tune --budget-min)"""
        self.cluster: Any = None
        """a :class:`compressor.cluster.Cluster`: branches are built as its tasks and each device's rows
        timed by its session actor; None: everything in this process"""
        self.device_request = device_request or "host"
        """the device as the recipe names it (``host`` or a profile): the cluster resource its rows are timed on"""
        self.passes = list(passes)
        self.targets = list(targets)
        self.baselines = list(baselines)  # targets that take the source model, as fair references
        self.branches = list(branches)
        self.hooks = HookList(hooks)
        self.cache = cache
        self.seed = seed

    def check(self, input_form: Form) -> list[Form]:
        """Walk the forms through every chain before anything runs; plan the conversion each target
        needs (e.g. export_onnx before an onnxruntime target given a torch model). Returns the
        forms of the main chain."""
        self.conversions: dict[int, Pass] = {}
        forms = check_chain(self.passes, self.targets, input_form)
        ends = [(input_form, self.baselines), (forms[-1], self.targets)]
        for b in self.branches:
            branch = check_chain(b.passes, b.targets, forms[-1], quantized_by=quantizing_step(self.passes))
            ends.append((branch[-1], b.targets))
        for form, targets in ends:
            for t in targets:
                conversion = conversion_for(form, t)
                if conversion is not None:
                    self.conversions[id(t)] = conversion
        return forms

    def planned_conversions(self) -> list[tuple[Target, Pass]]:
        """(target, the conversion pass run before it), as planned by :meth:`check`."""
        return [(t, self.conversions[id(t)]) for t in self.all_targets() if id(t) in self.conversions]

    def all_passes(self) -> list[Pass]:
        return [*self.passes, *(p for b in self.branches for p in b.passes),
                *(c for _, c in self.planned_conversions())]

    def check_data(self, has_data: bool) -> None:
        """Every pass and target whose config reads data, checked once before anything runs."""
        for p in self.all_passes():
            require_data(p.step, "pass", p.name, p.requires_data(), has_data)
        for t in self.all_targets():
            require_data(t.step, "target", t.name, t.requires_data(), has_data)

    def preflight(self, model: ModelArtifact, data: DataBundle | None) -> None:
        """Every pass checks what it can before any pass runs (e.g. a teacher's classes). A pass
        whose output is already in the cache is not checked again; its cached output is the
        next pass's input."""
        why = quantized_input(model)
        first = next((p for p in [*self.passes, *(p for b in self.branches for p in b.passes)] if p.quantizes), None)
        if why is not None and first is not None:
            raise PipelineOrderError(
                f"{first.step}: the input model is already quantized ({why}); a model is quantized once: "
                f"give the floating-point model, or remove the step"
            )
        main = self._preflight_chain(self.passes, model, data)
        for b in self.branches:
            self._preflight_chain(b.passes, main, data)

    def _preflight_chain(self, passes: Sequence[Pass], preview: ModelArtifact | None,
                         data: DataBundle | None) -> ModelArtifact | None:
        for p in passes:
            try:
                hit = self.cache.get(self.cache.key(p, preview, data)) if (self.cache and preview is not None) else None
                if hit is not None:
                    preview = hit[0]
                    continue
                p.preflight(preview, data)
                preview = p.preview(preview) if preview is not None else None
            except CompressorError:
                raise
            except Exception as exc:  # e.g. a library that cannot trace the model: one line, like run()
                raise PassError(f"{p.step}: pass {p.name!r} failed its check before the run: "
                                f"{type(exc).__name__}: {first_line(exc)}") from exc
        return preview

    # ------------------------------------------------------------------ running
    def run(
        self,
        model: ModelArtifact,
        *,
        data: DataBundle | None = None,
        out_dir: Path | None = None,
        evaluation: EvaluationConfig | None = None,
    ) -> RunResult:
        self.check(model.form)
        self.check_data(data is not None)
        if data is not None:
            check_classes(model, data)
        self.preflight(model, data)
        evaluation = evaluation or EvaluationConfig()
        threads = evaluation.threads or default_threads()
        tmp = run_scratch()
        result = RunResult(source=model, artifacts=[model], records=[], threads=threads, _tmp=tmp)
        self.hooks.on_run_start(model)
        artifact = model
        for index, p in enumerate(self.passes):
            artifact = self._run_pass(index, p, artifact, data, Path(tmp.name), threads, result)
        branch_outputs: list[ModelArtifact | None] = []
        remote = None
        if self.cluster is not None and self.branches and out_dir is not None:
            # every branch (its passes and engines) is a task on the cluster, built while this
            # process builds the main chain's engines; gathered after them, in the recipe's order
            remote = self.cluster.submit_branches(self, artifact, model, data, threads, Path(tmp.name))
        for b in self.branches if remote is None else ():
            if self.deadline is not None and time.monotonic() > self.deadline:
                result.skipped_branches.append(b.name)
                branch_outputs.append(None)
                continue
            out = artifact
            with self.on_device(self.branch_device(b)):
                for p in b.passes:
                    out = self._run_pass(len(result.records), p, out, data, Path(tmp.name), threads, result)
            branch_outputs.append(out)
        if out_dir is not None:
            chains = [(model, self.baselines, "source-"), (artifact, self.targets, ""),
                      *((out, b.targets, f"{b.name}-") for b, out in zip(self.branches, branch_outputs)
                        if out is not None)]
            devices = [self.device, self.device, *(self.branch_device(b) for b, out in zip(self.branches, branch_outputs)
                                                   if out is not None)]
            names = assign_engine_names(chains)
            for (art, targets, _), device in zip(chains, devices):
                with self.on_device(device):
                    self._build_chain(art, targets, names, data, Path(tmp.name), threads, result, Path(out_dir))
            if remote is not None:  # the branches built on the cluster meanwhile
                self.cluster.gather_branches(self, remote, result, Path(out_dir), Path(tmp.name))
        if data is not None and out_dir is not None:
            if self.cluster is not None:  # one timing session per device, on a node that carries it
                self.cluster.measure(self, data, evaluation, threads, result, Path(out_dir))
            else:
                measure_run(data, evaluation, threads, result, hooks=self.hooks, screen=self.screen,
                            timed_on=timed_here(self.device_request))
        self.hooks.on_run_end(result)
        return result

    def branch_device(self, b: BranchSpec) -> Device:
        """The profile a branch's passes and engines are for: its own ``device``, or the run's."""
        from .devices import resolve

        return resolve(b.device) if b.device else self.device

    @contextlib.contextmanager
    def on_device(self, device: Device) -> Iterator[None]:
        saved, self.device = self.device, device
        try:
            yield
        finally:
            self.device = saved

    def _build_chain(self, art: ModelArtifact, targets: Sequence[Target], names: dict[int, str],
                     data: DataBundle | None, tmp: Path, threads: int, result: RunResult, out_dir: Path) -> None:
        """Build every target of one chain from ``art``: each conversion a target needs is run once per
        chain and kind (a failed conversion fails the targets that needed it)."""
        converted: dict[str, ModelArtifact | TargetFailure] = {}
        for t in targets:
            source: ModelArtifact | TargetFailure = art
            conversion = self.conversions.get(id(t))
            if conversion is not None:
                if conversion.name not in converted:
                    converted[conversion.name] = self._convert(conversion, art, data, tmp, threads, result)
                source = converted[conversion.name]
            if isinstance(source, TargetFailure):
                result.failures.append(TargetFailure(t.name, t.step, source.reason, unavailable=False))
                continue
            self._build_target(t, source, out_dir, result, data, names[id(t)])

    def build_branch(self, b: BranchSpec, artifact: ModelArtifact, source: ModelArtifact, data: DataBundle | None,
                     out_dir: Path, threads: int) -> RunResult:
        """One branch alone, as a cluster worker runs it: its passes from ``artifact`` (the main chain's
        output; ``source``: the run's input model), then its targets built into ``out_dir/engines``.
        The result holds the branch's pass records and outputs, its engines and failures."""
        tmp = run_scratch()
        result = RunResult(source=source, artifacts=[], records=[], threads=threads, _tmp=tmp)
        out = artifact
        for p in b.passes:
            out = self._run_pass(len(result.records), p, out, data, Path(tmp.name), threads, result)
        names = assign_engine_names([(out, b.targets, f"{b.name}-")])
        self.conversions = {id(t): c for t in b.targets if (c := conversion_for(out.form, t)) is not None}
        self._build_chain(out, b.targets, names, data, Path(tmp.name), threads, result, out_dir)
        return result

    def _run_pass(
        self,
        index: int,
        p: Pass,
        artifact: ModelArtifact,
        data: DataBundle | None,
        tmp: Path,
        threads: int,
        result: RunResult,
    ) -> ModelArtifact:
        self.hooks.on_pass_start(index, p, artifact)
        started = time.perf_counter()
        key = self.cache.key(p, artifact, data, result.source, self.device) if self.cache else None
        hit = self.cache.get(key) if (self.cache and key) else None
        if hit is not None:
            out, metrics = hit
            cached = True
        else:
            work = tmp / f"{index:02d}-{p.name}"
            work.mkdir(parents=True, exist_ok=True)
            ctx = PassContext(work_dir=work, data=data, seed=self.seed, threads=threads,
                              cache_dir=self.cache.root if self.cache else None, source=result.source,
                              device=self.device, progress=self.hooks.shows_progress())
            res = p(artifact, ctx)
            out, metrics, cached = res.artifact, res.metrics, False
            out.lineage = artifact.lineage + [
                {"pass": p.name, "step": p.step, "config": p.config.model_dump(mode="json"),
                 "input_hash": artifact.content_hash()}
            ]
            if self.cache and key:
                out = self.cache.put(key, out, metrics)
        seconds = time.perf_counter() - started
        record = PassRecord(
            index=index,
            name=p.name,
            step=p.step,
            config=p.config.model_dump(mode="json"),
            form_in=artifact.form.value,
            form_out=out.form.value,
            seconds=seconds,
            cached=cached,
            metrics=metrics,
            input_hash=artifact.content_hash(),
            output_hash=out.content_hash(),
        )
        result.records.append(record)
        result.artifacts.append(out)
        self.hooks.on_pass_end(index, p, record)
        return out

    def _convert(self, conversion: Pass, artifact: ModelArtifact, data: DataBundle | None, tmp: Path, threads: int,
                 result: RunResult) -> ModelArtifact | TargetFailure:
        """Run a conversion the manager inserted before a target, as any pass (cached, recorded,
        in the lineage). Its failure fails the targets that needed it, not the run."""
        try:
            return self._run_pass(len(result.records), conversion, artifact, data, tmp, threads, result)
        except PassError as exc:
            return TargetFailure(conversion.name, conversion.step, str(exc), unavailable=False)

    def _build_target(self, t: Target, artifact: ModelArtifact, out_dir: Path, result: RunResult,
                      data: DataBundle | None, name: str) -> None:
        self.hooks.on_target_start(t)
        t.device = self.device
        try:
            engine = t.build(artifact, out_dir / "engines", data=data, name=name)
        except TargetError as exc:
            result.failures.append(TargetFailure(t.name, t.step, str(exc),
                                                 unavailable=isinstance(exc, TargetUnavailable)))
            self.hooks.on_target_end(t, None, str(exc))
            return
        result.engines.append(engine)
        if not engine.built:
            reason = engine.info["not_built"]
            result.failures.append(TargetFailure(t.name, t.step, f"{reason}; wrote {engine.path.name} and "
                                                 f"the build command to {engine.path.parent.name}/", unavailable=True))
            self.hooks.on_target_end(t, None, reason)
            return
        self.hooks.on_target_end(t, engine, None)

    def all_targets(self) -> list[Target]:
        return [*self.baselines, *self.targets, *(t for b in self.branches for t in b.targets)]


def check_classes(model: ModelArtifact, data: DataBundle) -> None:
    width = model.meta.get("num_outputs")
    if width is not None and width != len(data.classes):
        raise DataError(
            f"the model has {width} outputs but the data set has {len(data.classes)} classes "
            f"({', '.join(data.classes[:5])}{', ...' if len(data.classes) > 5 else ''})"
        )
    if model.classes and list(model.classes) != list(data.classes):
        log.warning("model classes %s differ from the data set's %s", model.classes, data.classes)
