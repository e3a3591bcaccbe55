"""How a batch run tells its progress: silently (library use) or on a terminal (the CLI)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn


class Reporter:
    """Where a run tells its progress; the default tells nothing (library use)."""

    def start(self, total: int) -> None: ...

    def advance(self, count: int = 1) -> None: ...

    def failure(self, path: str, reason: str) -> None: ...

    def close(self) -> None: ...


class RichReporter(Reporter):
    """A progress bar on a terminal (count, images/s, ETA); one stderr line per failure."""

    def __init__(self, show_progress: bool):
        self.progress = None
        if show_progress:
            self.progress = Progress(
                TextColumn("[bold]restoring"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )

    def start(self, total: int) -> None:
        if self.progress:
            self.progress.start()
            self.task = self.progress.add_task("run", total=total, rate="")

    def advance(self, count: int = 1) -> None:
        if self.progress and count:
            self.progress.advance(self.task, count)
            speed = self.progress.tasks[0].speed
            self.progress.update(self.task, rate=f"{speed:.2f} img/s" if speed else "")

    def failure(self, path: str, reason: str) -> None:
        line = f"{path}: {reason}"
        if self.progress:
            self.progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


def download_progress(console: Console):
    """A factory of per-file download callbacks drawing rich progress bars (bytes, speed, ETA)."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    def for_file(label: str):
        progress = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True)
        task = progress.add_task(label, total=None)
        progress.start()

        def update(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)
            if total is not None and done >= total:
                progress.stop()

        return update

    return for_file
