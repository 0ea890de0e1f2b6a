"""Progress on a TTY (rich, on stderr); silence otherwise. Engine code calls
``ui.task(...)`` and never knows whether anyone is watching."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator



class _NullTask:
    def update(self, **_: Any) -> None:
        pass


class _Task:
    def __init__(self, progress: Any, task_id: Any) -> None:
        self._p, self._id = progress, task_id

    def update(self, *, completed: float | None = None, total: float | None = None, description: str | None = None) -> None:
        kw: dict[str, Any] = {}
        if completed is not None:
            kw["completed"] = completed
        if total:
            kw["total"] = total
        if description:
            kw["description"] = description
        self._p.update(self._id, **kw)


class UI:
    """rich is imported only when progress is shown (a TTY): unattended runs skip it."""

    def __init__(self, console: Any = None, *, enabled: bool | None = None) -> None:
        self.console = console
        if enabled is None:
            enabled = console is not None and console.is_terminal
        self.enabled = enabled

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Any]:
        if not self.enabled:
            yield _NullTask()
            return
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TransferSpeedColumn

        if self.console is None:
            self.console = Console(stderr=True)
        progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
            console=self.console, transient=True,
        )
        with progress:
            yield _Task(progress, progress.add_task(description, total=total))
