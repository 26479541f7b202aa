"""Planning progress on a terminal: a spinner per phase ("tracing", "strategies", "ILP", "DP").

A phase named "group: step" (the pipeline search: "pipeline B=4: layer 2/3 on view (8, 1)")
updates the line of the phase before it when that one is of the same group, so a search of many
steps shows one line per group, each saying where it is.

``PlanProgress`` is the ``progress=`` callback of ``al.plan``. It draws on stderr only when
stderr is a terminal, and erases itself when done, so piped or redirected output stays clean
(no escape codes, no progress lines) and the report that follows is the only thing printed.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn


class PlanProgress:
    """Context manager; call it with a phase name as each phase starts.

    ``prefix`` labels the phases of one of several plans (``alpa-lite compare``: "zero3: ILP").
    """

    def __init__(self, console: Console | None = None, prefix: str = ""):
        self.console = console if console is not None else Console(stderr=True)
        self.enabled = self.console.is_terminal
        self.prefix = prefix
        self.phases: list[str] = []  # every phase seen, shown or not
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> PlanProgress:
        if self.enabled:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=self.console, transient=True)
            self._progress.start()
        return self

    def __call__(self, phase: str) -> None:
        group = phase.split(":")[0] if ":" in phase else None
        same = group is not None and self.phases and self.phases[-1].startswith(f"{self.prefix}{group}:")
        self.phases.append(f"{self.prefix}{phase}")
        if self._progress is None:
            return
        if same and self._task is not None:
            self._progress.update(self._task, description=f"{self.prefix}{phase} …")
            return
        if self._task is not None:
            self._progress.update(self._task, completed=1, total=1)
            self._progress.stop_task(self._task)
        self._task = self._progress.add_task(f"{self.prefix}{phase} …", total=None)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
