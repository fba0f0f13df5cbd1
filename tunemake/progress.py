"""Build progress: a rich live view on a terminal, plain lines otherwise (CI logs)."""

from __future__ import annotations

import sys
import time

SYMBOLS = {"queued": "·", "waiting": "…", "running": "▶", "cached": "✓", "done": "✓",
           "failed": "✗", "skipped": "-", "up to date": "✓"}
PROGRESS_EVERY = 5.0  # seconds between progress lines per target in plain mode


def reporter(live: bool | None = None):
    if live is None:
        live = sys.stdout.isatty()
    return LiveReporter() if live else PlainReporter()


def _fmt_progress(p: dict | None) -> str:
    if not p:
        return ""
    head = f"{p['done']}/{p['total']}" if p.get("done") is not None and p.get("total") else (
        str(p["done"]) if p.get("done") is not None else "")
    return " ".join(x for x in (head, p.get("message") or "") if x)


class PlainReporter:
    """One line per event, safe to read in a CI log."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self._last_progress: dict[str, float] = {}

    def start(self, names: list[str]) -> None:
        pass

    def update(self, name: str, status: str, detail: str = "") -> None:
        if status in ("queued", "up to date"):
            return  # a no-op build of 1,000 targets should print one line, not 1,000
        line = f"{status:>10}  {name}"
        if detail:
            line += f"  ({detail})"
        print(line, file=self.stream, flush=True)

    def progress(self, name: str, p: dict) -> None:
        now = time.monotonic()
        if now - self._last_progress.get(name, 0.0) < PROGRESS_EVERY:
            return
        self._last_progress[name] = now
        print(f"{'':>10}  {name}: {_fmt_progress(p)}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def tick(self) -> None:
        pass

    def stop(self) -> None:
        pass


class LiveReporter:
    """A rich live table: every target with its state, elapsed time and the step's own progress.

    rich is imported and the view started only once there is work to show, so a no-op
    build on a terminal costs no more than one in CI.
    """

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.live = None
        self.console = None

    def _ensure_live(self) -> None:
        if self.live is None:
            from rich.console import Console
            from rich.live import Live

            self.console = Console()
            self.live = Live(console=self.console, refresh_per_second=8, transient=False)
            self.live.start()

    def start(self, names: list[str]) -> None:
        for name in names:
            self.rows[name] = {"status": "queued", "detail": "", "since": None, "progress": None}

    def update(self, name: str, status: str, detail: str = "") -> None:
        row = self.rows.setdefault(name, {"status": status, "detail": "", "since": None, "progress": None})
        row.update(status=status, detail=detail)
        if status == "running":
            row["since"] = time.monotonic()
        if status in ("queued", "up to date") and self.live is None:
            return
        self._ensure_live()
        self.live.update(self._render())

    def progress(self, name: str, p: dict) -> None:
        if name in self.rows:
            self.rows[name]["progress"] = p
            if self.rows[name]["since"] is None:  # a download: show it like a running step
                self.rows[name].update(status="running", since=time.monotonic())
            if self.live is not None:  # may come from a download thread: Live.update takes a lock
                self.live.update(self._render())

    def message(self, text: str) -> None:
        self._ensure_live()
        self.console.print(text, markup=False, highlight=False)

    def tick(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()

    def _render(self):
        from rich.table import Table

        styles = {"running": "bold yellow", "failed": "bold red", "done": "green", "cached": "cyan",
                  "up to date": "dim", "skipped": "dim", "waiting": "magenta", "queued": "dim"}
        table = Table(show_header=False, box=None, pad_edge=False)
        for name, row in self.rows.items():
            status = row["status"]
            detail = row["detail"]
            if status == "running" and row["since"] is not None:
                detail = f"{time.monotonic() - row['since']:.1f}s {_fmt_progress(row['progress'])}".strip()
            table.add_row(f"[{styles.get(status, '')}]{SYMBOLS.get(status, ' ')} {status}[/]", name, detail)
        return table
