"""What a long run tells the person watching it, behind one small interface, and the stage timer.

The pipeline never holds a console: it is handed a `Progress` (silent by default; the CLI passes a
`ConsoleProgress`) and reports finished stages, notes, warnings and step counts to it. Timings are plain data
(`{stage: seconds}`) that travel with the results, so a caller that ran stages of its own first (export,
tokenize) hands its timings on and the report lists every stage in order.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Protocol

Step = Callable[[], None]


class Progress(Protocol):
    """Receives what a run has to say; every method may be a no-op."""

    def stage_done(self, name: str, seconds: float, peak_mb: float | None = None) -> None:
        """A stage finished (`peak_mb`: the process's peak resident memory so far)."""

    def note(self, text: str) -> None:
        """A line worth showing (e.g. "statistics from cache", a budget's result)."""

    def warn(self, text: str) -> None:
        """Something the user should know that does not stop the run."""

    def steps(self, description: str, total: int) -> Step:
        """A counter of `total` steps; the returned function is called once per step done."""


class SilentProgress:
    """Shows nothing (the Python API's default)."""

    def stage_done(self, name: str, seconds: float, peak_mb: float | None = None) -> None:
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

    def stage_done(self, name: str, seconds: float, peak_mb: float | None = None) -> None:
        peak = "" if peak_mb is None else f", peak {peak_mb / 1024:.2f} GB"
        self.console.print(f"[green]✓[/green] {name} ({seconds:.1f} s{peak})")

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


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far, in MiB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not on Linux or macOS
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


def return_freed_memory() -> None:
    """Hand the memory freed so far back to the operating system where the C library keeps it (glibc keeps freed
    blocks under 32 MB for reuse): a build that frees one group's statistics before the next then shows it in its
    resident size. Nothing happens elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library (musl)
            pass


class StageTimer:
    """Times named stages into `timings` and the peak resident memory at each one's end into `peaks` (continuing
    `earlier` ones, and `earlier_peaks`), and tells `progress` as each ends."""

    def __init__(self, progress: Progress = SILENT, earlier: Mapping[str, float] | None = None,
                 earlier_peaks: Mapping[str, float] | None = None):
        self.progress = progress
        self.timings: dict[str, float] = dict(earlier or {})
        self.peaks: dict[str, float] = dict(earlier_peaks or {})

    @contextmanager
    def stage(self, name: str, part: bool = False) -> Iterator[None]:
        """Time one stage; `part`: one of several turns of a stage that alternates with another (calibrating and
        decomposing group by group), added up and told once, by `parts_done`."""
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings[name] = round(self.timings.get(name, 0.0) + elapsed if part else elapsed, 3)
        peak = peak_rss_mb()
        if peak is not None:
            self.peaks[name] = peak
        if not part:
            self.progress.stage_done(name, self.timings[name], peak)

    def parts_done(self, *names: str) -> None:
        """Tell the stages timed in parts, each once with its total."""
        for name in names:
            if name in self.timings:
                self.progress.stage_done(name, self.timings[name], self.peaks.get(name))
