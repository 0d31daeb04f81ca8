"""What a long run tells the person watching it, behind one small interface, and the stage timer.

The pipeline never holds a console: it is handed a `Progress` (silent by default; the CLI passes a
`ConsoleProgress`) and reports finished stages, notes, warnings and step counts to it. Timings are plain data
(`{stage: seconds}`) that travel with the results, so a caller that ran stages of its own first (export,
tokenize) hands its timings on and the report lists every stage in order.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Protocol

Step = Callable[[], None]


class Progress(Protocol):
    """Receives what a run has to say; every method may be a no-op."""

    def stage_done(self, name: str, seconds: float) -> None:
        """A stage finished."""

    def note(self, text: str) -> None:
        """A line worth showing (e.g. "statistics from cache", a budget's result)."""

    def warn(self, text: str) -> None:
        """Something the user should know that does not stop the run."""

    def steps(self, description: str, total: int) -> Step:
        """A counter of `total` steps; the returned function is called once per step done."""


class SilentProgress:
    """Shows nothing (the Python API's default)."""

    def stage_done(self, name: str, seconds: float) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        pass

    def steps(self, description: str, total: int) -> Step:
        return lambda: None


SILENT = SilentProgress()


class ConsoleProgress:
    """Shows stages, notes and warnings on a rich console, and steps as a transient progress bar."""

    def __init__(self, console):
        self.console = console

    def stage_done(self, name: str, seconds: float) -> None:
        self.console.print(f"[green]✓[/green] {name} ({seconds:.1f} s)")

    def note(self, text: str) -> None:
        self.console.print(text)

    def warn(self, text: str) -> None:
        self.console.print(f"[yellow]Warning:[/yellow] {text}")

    def steps(self, description: str, total: int) -> Step:
        from rich.progress import Progress as Bar

        bar = Bar(console=self.console, transient=True)
        bar.start()
        task = bar.add_task(description, total=total)

        def advance() -> None:
            bar.advance(task)
            if bar.finished:
                bar.stop()

        return advance


class StageTimer:
    """Times named stages into `timings` (continuing `earlier` ones) and tells `progress` as each ends."""

    def __init__(self, progress: Progress = SILENT, earlier: Mapping[str, float] | None = None):
        self.progress = progress
        self.timings: dict[str, float] = dict(earlier or {})

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        self.progress.stage_done(name, self.timings[name])
