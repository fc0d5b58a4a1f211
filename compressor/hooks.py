"""Pipeline hooks: observers for timing, logging and progress, kept out of the passes."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:
    from .evaluate import Measurement
    from .pass_base import Pass
    from .records import PassRecord, RunResult
    from .target_base import Engine, Target

log = logging.getLogger("compressor")


class Hook:
    """Override what you need; every method is optional."""

    def on_run_start(self, artifact: Any) -> None: ...
    def on_pass_start(self, index: int, p: Pass, artifact: Any) -> None: ...
    def on_pass_end(self, index: int, p: Pass, record: PassRecord) -> None: ...
    def on_target_start(self, target: Target) -> None: ...
    def on_target_end(self, target: Target, engine: Engine | None, error: str | None) -> None: ...
    def on_measure_start(self, name: str) -> None: ...
    def on_measure_end(self, measurement: Measurement) -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_run_end(self, result: RunResult) -> None: ...


class HookList(Hook):
    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_"):
            hooks = object.__getattribute__(self, "hooks")

            def call(*args: Any) -> None:
                for h in hooks:
                    getattr(h, name)(*args)

            return call
        return object.__getattribute__(self, name)

    def shows_progress(self) -> bool:
        """Whether a progress display is on (-q runs with none): passes show their own bars only then."""
        return any(isinstance(h, ProgressHook) for h in object.__getattribute__(self, "hooks"))


class TimingHook(Hook):
    """Wall-clock seconds of every stage: pass, engine build and measurement."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t0: dict[str, float] = {}

    def _start(self, key: str) -> None:
        self._t0[key] = time.perf_counter()

    def _stop(self, key: str) -> None:
        if key in self._t0:
            self.timings[key] = time.perf_counter() - self._t0.pop(key)

    def on_pass_start(self, index: int, p: Pass, artifact: Any) -> None:
        self._start(f"pass:{p.step}")

    def on_pass_end(self, index: int, p: Pass, record: PassRecord) -> None:
        self._stop(f"pass:{p.step}")

    def on_target_start(self, target: Target) -> None:
        self._start(f"build:{target.step}")

    def on_target_end(self, target: Target, engine: Engine | None, error: str | None) -> None:
        self._stop(f"build:{target.step}")

    def on_measure_start(self, name: str) -> None:
        self._start(f"measure:{name}")

    def on_measure_end(self, measurement: Measurement) -> None:
        self._stop(f"measure:{measurement.name}")


class LoggingHook(Hook):
    def on_pass_start(self, index: int, p: Pass, artifact: Any) -> None:
        log.info("pass %d %s on %s", index, p.name, artifact)

    def on_pass_end(self, index: int, p: Pass, record: PassRecord) -> None:
        how = "cached" if record.cached else f"{record.seconds:.1f}s"
        log.info("pass %d %s done (%s) %s", index, p.name, how, record.metrics)

    def on_target_end(self, target: Target, engine: Engine | None, error: str | None) -> None:
        if engine is not None:
            log.info("target %s built %s (%d bytes)", target.name, engine.path, engine.size_bytes)
        else:
            log.warning("target %s not built: %s", target.name, error)

    def on_message(self, text: str) -> None:
        log.debug(text)


class ProgressHook(Hook):
    """A rich status line that shows the stage in progress."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self._status: Any = None

    def _show(self, text: str) -> None:
        if self._status is None:
            self._status = self.console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def on_pass_start(self, index: int, p: Pass, artifact: Any) -> None:
        self._show(f"[bold]pass {index}[/] {p.name}")

    def on_pass_end(self, index: int, p: Pass, record: PassRecord) -> None:
        how = "[dim]cached[/]" if record.cached else f"{record.seconds:.1f}s"
        self.console.print(f"[green]✓[/] pass {index} {p.name} ({how})")

    def on_target_start(self, target: Target) -> None:
        self._show(f"[bold]building[/] {target.name}")

    def on_target_end(self, target: Target, engine: Engine | None, error: str | None) -> None:
        if engine is not None:
            self.console.print(f"[green]✓[/] engine {engine.name} ({engine.size_bytes / 1e6:.1f} MB)")
        else:
            self.console.print(f"[yellow]![/] target {target.name} not built: {error}")

    def on_message(self, text: str) -> None:
        self._show(f"[bold]measuring[/] {text}")

    def on_measure_end(self, measurement: Measurement) -> None:
        self.console.print(f"[green]✓[/] measured {measurement.name}")

    def on_run_end(self, result: RunResult) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None



class _HeldRecords(logging.Handler):
    """The log records of a block, kept to be handled after it."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def library_output(what: str) -> Iterator[None]:
    """What a library prints while it works, NNCF's progress bars (rich) and ONNX Runtime's
    calibration text (print) among them, kept off the console unless logging is at INFO (``-v``):
    sys.stdout and sys.stderr are captured for the block and the text logged at DEBUG. What is
    logged in the block is held and handled after it, so a warning is still seen. Call it after
    the library is imported (a logging handler it makes holds the stream it found)."""
    if log.isEnabledFor(logging.INFO):
        yield
        return
    root = logging.getLogger()
    handlers, held = root.handlers[:], _HeldRecords()
    root.handlers = [held]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        root.handlers = handlers
        for record in held.records:
            for handler in handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
        text = (out.getvalue() + err.getvalue()).strip()
        if text:
            log.debug("%s printed:\n%s", what, text)
