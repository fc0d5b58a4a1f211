"""What a run leaves behind in memory: one record per pass that ran (or was taken from the
cache), one per target that could not build or run, and the run's result. The pass manager
writes them; hooks, the report and compare read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .artifact import ModelArtifact
    from .evaluate import Measurement
    from .target_base import Engine


@dataclass
class PassRecord:
    index: int
    name: str
    step: str
    config: dict[str, Any]
    form_in: str
    form_out: str
    seconds: float
    cached: bool
    metrics: dict[str, Any]
    input_hash: str
    output_hash: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TargetFailure:
    target: str
    step: str
    reason: str
    unavailable: bool

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunResult:
    source: ModelArtifact
    artifacts: list[ModelArtifact]
    records: list[PassRecord]
    engines: list[Engine] = field(default_factory=list)
    failures: list[TargetFailure] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    threads: int = 1
    timing_load: dict[str, Any] | None = None  # load.LoadMonitor.summary() of the timing rounds
    timing: dict[str, Any] | None = None  # evaluate.timing_method(): how batch-1 latency was timed
    skipped_branches: list[str] = field(default_factory=list)  # not started: Pipeline.deadline passed
    cluster: dict[str, Any] | None = None  # cluster.Cluster.summary(): where each stage ran, each device's session
    sessions: list[dict[str, Any]] = field(default_factory=list)  # a cluster's timing sessions, one per device
    _tmp: Any = field(default=None, repr=False)

    @property
    def final(self) -> ModelArtifact:
        return self.artifacts[-1]
