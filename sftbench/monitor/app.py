"""The Textual monitor: renders ``state`` / ``rows`` / ``table`` fed by a ``session.Session``.

Views (``tab`` cycles): run (header, per-rank table, charts, GPU/host summary), sweep (plan entries or discovered
runs; ``s`` sorts, Enter opens a run), GPU (NVML per GPU with the ranks on it, host RAM, rank RSS).
Updates are incremental: logs are read by offset once per refresh, tables are diffed cell by cell, widgets of
hidden views are refreshed only when shown.
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import ContentSwitcher, DataTable, Footer, Static

from sftbench.fmt import fmt_g

from .rows import GPU_COLUMNS, RANK_COLUMNS, RSS_COLUMNS, chart, gpu_rows, host_line, rank_rows, rss_rows, series
from .session import Session
from .state import STATUS_STYLES, Cell, header_lines
from .table import SORTS, TABLE_COLUMNS, counts_line, entry_row, sort_entries

VIEWS = ("run", "sweep", "gpu")


def _cell(c: Cell) -> Any:
    return Text(c.text, style=c.style) if c.style else c.text


class TableSync:
    """Keeps a DataTable equal to a list of rows, touching only the cells that changed."""

    def __init__(self, table: DataTable, columns: Sequence[tuple[str, str]]):
        self.table = table
        self.columns = [k for k, _ in columns]
        for key, label in columns:
            table.add_column(label, key=key)
        self.order: list[str] = []
        self.rows: dict[str, dict[str, Cell]] = {}
        self.cell_updates = 0

    def sync(self, rows: Sequence[tuple[str, dict[str, Cell]]]) -> None:
        t = self.table
        keys = [k for k, _ in rows]
        if keys != self.order:
            cur = None
            if self.order and 0 <= t.cursor_row < len(self.order):
                cur = self.order[t.cursor_row]
            t.clear()
            for key, cells in rows:
                t.add_row(*[_cell(cells.get(c, Cell("-"))) for c in self.columns], key=key)
            self.order = keys
            self.rows = {k: dict(c) for k, c in rows}
            if cur in keys:
                t.move_cursor(row=keys.index(cur), animate=False)
            return
        for key, cells in rows:
            old = self.rows[key]
            for c in self.columns:
                new = cells.get(c, Cell("-"))
                prev = old.get(c)
                if prev != new:
                    grow = prev is None or len(new.text) > len(prev.text)
                    t.update_cell(key, c, _cell(new), update_width=grow)
                    self.cell_updates += 1
            self.rows[key] = dict(cells)

    def reset(self) -> None:
        self.table.clear()
        self.order = []
        self.rows = {}

    def cursor_key(self) -> str | None:
        r = self.table.cursor_row
        return self.order[r] if 0 <= r < len(self.order) else None


class StepChart(Widget):
    """A small block-character bar chart of one series over steps; warm-up bars are dimmed."""

    DEFAULT_CSS = """
    StepChart { height: 3; }
    """

    def __init__(self, title: str, *, id: str | None = None):
        super().__init__(id=id)
        self.title = title
        self._values: list[float | None] = []
        self._warm: list[bool] = []
        self._steps: list[int] = []
        self._sig: tuple | None = None

    def set_data(self, values: list[float | None], warm: list[bool], steps: list[int]) -> None:
        sig = (len(values), steps[-1] if steps else None, values[-1] if values else None,
               steps[0] if steps else None)
        if sig == self._sig:
            return
        self._sig = sig
        self._values, self._warm, self._steps = values, warm, steps
        self.refresh()

    def render(self) -> Text:
        width = max(10, self.size.width)
        height = max(1, self.size.height - 1)
        lines, warm, lo, hi = chart(self._values, self._warm, width, height)
        t = Text()
        if lo is None:
            t.append(f"{self.title}: no data yet", style="dim")
            return t
        last = next((v for v in reversed(self._values) if v is not None), None)
        first_step = self._steps[0] if self._steps else "-"
        last_step = self._steps[-1] if self._steps else "-"
        t.append(f"{self.title}", style="bold")
        t.append(f"  steps {first_step}-{last_step}  min {fmt_g(lo)}  max {fmt_g(hi)}  last {fmt_g(last)}")
        if any(warm):
            t.append("  (dim = warm-up)", style="dim")
        for line in lines:
            t.append("\n")
            # one span per run of equal style (per-character spans make rendering ~50x dearer)
            i, n = 0, len(line)
            while i < n:
                w = warm[i]
                j = i + 1
                while j < n and warm[j] == w:
                    j += 1
                t.append(line[i:j], style="grey50" if w else "cyan")
                i = j
        return t


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "close", "close"), Binding("q", "close", "close"),
                Binding("question_mark", "close", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical { width: 72; height: auto; border: thick $primary; background: $surface; padding: 1 2; }
    """

    TEXT = """[b]sftbench monitor - keys[/b]

  q          quit
  ?          this help (Esc / q / ? close it)
  p          pause / resume updates
  tab        switch view: run -> sweep -> GPU
  s          sort the sweep table (cycles the sort column)
  enter      in the sweep table: open that run in the run view
  f          follow the newest run again (after opening one)
  up/down    move in tables (the run view charts follow the selected rank)
  ctrl+p     command palette: "Export view as JSON", pause, follow

Warm-up steps are dimmed and left out of the EMA and median s/it.
Host RSS 'live' comes from psutil for ranks on this host, 'log' is the last logged value."""

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.TEXT, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)


class MonitorCommands(Provider):
    """Command-palette entries of the monitor."""

    def _commands(self) -> list[tuple[str, Any, str]]:
        app = self.app
        assert isinstance(app, MonitorApp)
        return [
            ("Export view as JSON", app.action_export_json, "write the current view's data to a JSON file"),
            ("Pause / resume updates", app.action_pause, "stop or restart reading logs and sampling GPUs"),
            ("Follow newest run", app.action_follow, "show the newest run again"),
        ]

    async def discover(self) -> Hits:
        for name, cb, help_text in self._commands():
            yield DiscoveryHit(name, cb, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, cb, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), cb, text=name, help=help_text)


class MonitorApp(App[None]):
    TITLE = "sftbench monitor"
    COMMANDS = App.COMMANDS | {MonitorCommands}
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("p", "pause", "pause"),
        Binding("tab", "next_view", "view", priority=True),
        Binding("s", "sort", "sort"),
        Binding("f", "follow", "follow newest"),
    ]
    CSS = """
    #topbar { height: 1; background: $boost; padding: 0 1; }
    .view { height: 1fr; }
    #run-header { height: auto; padding: 0 1; }
    #rank-table { height: auto; max-height: 18; }
    #charts { height: auto; padding: 0 1; }
    #gpu-brief { height: auto; padding: 0 1; margin-top: 1; }
    #host-brief { height: auto; padding: 0 1; }
    #sweep-header, #gpu-status, #host-line { height: auto; padding: 0 1; }
    #sweep-table { height: 1fr; }
    #gpu-table { height: auto; max-height: 20; }
    #rss-table { height: auto; }
    """

    def __init__(self, session: Session, refresh: float = 1.0, gpu_interval: float = 1.0,
                 export_dir: str | Path = "."):
        super().__init__()
        self.session = session
        self.refresh_s = refresh
        self.gpu_interval = gpu_interval
        self.export_dir = Path(export_dir)
        self.paused = False
        self.view = "run"
        self.sort_index = 0
        self.chart_rank: int | None = None
        self.ticks = 0
        self.last_export: Path | None = None
        self._dirty: dict[str, set[str]] = {}
        self._rss_shown: dict[int, float] | None = None
        self._seen_run_version = -1
        self._seen_table_version = -1
        self._seen_gpu_version = -1
        self._last_data = "-"
        self._static_cache: dict[str, Any] = {}
        self._catchup_pending = False
        self._was_catching_up = False

    # -- layout
    def compose(self) -> ComposeResult:
        yield Static("", id="topbar")
        with ContentSwitcher(initial="run-view", id="views"):
            with VerticalScroll(id="run-view", classes="view"):
                yield Static("", id="run-header")
                yield DataTable(id="rank-table", cursor_type="row", zebra_stripes=True)
                with Vertical(id="charts"):
                    yield StepChart("s/it", id="chart-s")
                    yield StepChart("loss", id="chart-loss")
                    yield StepChart("GPU mem (NVML, MiB)", id="chart-mem")
                yield Static("", id="gpu-brief")
                yield Static("", id="host-brief")
            with Vertical(id="sweep-view", classes="view"):
                yield Static("", id="sweep-header")
                yield DataTable(id="sweep-table", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="gpu-view", classes="view"):
                yield Static("", id="gpu-status")
                yield DataTable(id="gpu-table", cursor_type="row")
                yield Static("", id="host-line")
                yield DataTable(id="rss-table", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        # Widgets are looked up once: App.query_one searches the *active* screen, which is the help screen or the
        # command palette while those are open.
        self._w: dict[str, Widget] = {w.id: w for w in self.screen.query("*") if w.id}
        self.rank_sync = TableSync(self.query_one("#rank-table", DataTable), RANK_COLUMNS)
        self.sweep_sync = TableSync(self.query_one("#sweep-table", DataTable), TABLE_COLUMNS)
        self.gpu_sync = TableSync(self.query_one("#gpu-table", DataTable), GPU_COLUMNS)
        self.rss_sync = TableSync(self.query_one("#rss-table", DataTable), RSS_COLUMNS)
        # A long backlog (10k-step files) is read under a time budget: the UI shows at once and fills in over a
        # few quick follow-up polls instead of blocking start-up.
        self.session.poll(force_table=True, budget_s=self.CATCHUP_BUDGET_S)
        self.session.sample_gpu()
        self._last_data = datetime.now().strftime("%H:%M:%S")
        self._render_all(force=True)
        self.set_interval(self.refresh_s, self.tick)
        self.set_interval(self.gpu_interval, self.gpu_tick)
        self._schedule_catchup()

    # -- periodic work
    CATCHUP_BUDGET_S = 0.2

    def _schedule_catchup(self) -> None:
        if self.session.catching_up and not self._catchup_pending:
            self._catchup_pending = True
            self.set_timer(0.02, self._catchup)

    def _catchup(self) -> None:
        self._catchup_pending = False
        self.tick()

    def tick(self) -> None:
        if self.paused or self._exit:
            return
        self.ticks += 1
        changed = self.session.poll(budget_s=self.CATCHUP_BUDGET_S)
        if "switched" in changed:
            self.rank_sync.reset()
            self.chart_rank = None
            self._seen_run_version = -1
        if changed:
            self._last_data = datetime.now().strftime("%H:%M:%S")
            self._render_all()
        elif self._was_catching_up:
            self._render_topbar()
        self._was_catching_up = self.session.catching_up
        self._schedule_catchup()

    def gpu_tick(self) -> None:
        if self.paused or self._exit:
            return
        self.session.sample_gpu()
        self._render_all()

    def refresh_now(self) -> None:
        """Poll and sample at once (tests and Enter in the sweep table)."""
        self.session.poll(force_table=True)
        self.session.sample_gpu()
        self._render_all()

    # -- rendering
    def _set_static(self, wid: str, content: Any, key: Any = None) -> None:
        k = key if key is not None else (content.plain + str(content.spans) if isinstance(content, Text)
                                         else content)
        if self._static_cache.get(wid) == k:
            return
        self._static_cache[wid] = k
        self._w[wid].update(content)

    def _mark(self, views, part: str) -> None:
        for v in views:
            self._dirty.setdefault(v, set()).add(part)

    def _render_all(self, force: bool = False) -> None:
        """Render what changed, for the visible view only; hidden views catch up when shown.

        Parts: "data" (logs: header, tables, charts) and "hw" (GPU/host samples), so the once-a-second GPU sample
        does not redo the log-derived widgets.
        """
        s = self.session
        run = s.run
        if run is not None and run.version != self._seen_run_version:
            self._seen_run_version = run.version
            self._mark(("run", "gpu"), "data")
        if s.table is not None and s.table.version != self._seen_table_version:
            self._seen_table_version = s.table.version
            self._mark(("sweep",), "data")
        if s.gpu_version != self._seen_gpu_version:
            self._seen_gpu_version = s.gpu_version
            self._mark(("run", "gpu"), "hw")
        if force:
            self._mark(VIEWS, "data")
            self._mark(("run", "gpu"), "hw")
        self._render_topbar()
        parts = self._dirty.pop(self.view, None)
        if parts:
            getattr(self, f"_render_{self.view}")(parts)

    def _render_topbar(self) -> None:
        s = self.session
        t = Text()
        t.append("sftbench monitor", style="bold")
        t.append(f"  view: {self.view}")
        tgt = s.target
        what = {"follow": "newest run under", "run": "run", "sweep": "sweep", "results": "runs under"}[tgt.kind]
        t.append(f"  |  {what} {tgt.path}")
        if tgt.kind != "run":
            t.append("  (pinned, f = follow)" if s.pinned else "  (following)", style="dim")
        if self.paused:
            t.append("  PAUSED", style="bold reverse yellow")
        if s.catching_up and s.watcher is not None:
            done, total = s.watcher.progress()
            t.append(f"  reading logs {done / 2**20:.0f}/{total / 2**20:.0f} MiB", style="bold yellow")
        t.append(f"  |  refresh {self.refresh_s:g}s  last data {self._last_data}", style="dim")
        self._set_static("topbar", t)

    def _render_run(self, parts: set[str] = frozenset({"data", "hw"})) -> None:
        s = self.session
        run = s.run
        if "hw" in parts:
            self._set_static("gpu-brief", self._gpu_brief())
            text, style = host_line(s.host)
            self._set_static("host-brief", Text(text, style=style))
            if "data" not in parts and run is not None and s.live_rss != self._rss_shown:
                self._rss_shown = dict(s.live_rss)
                self.rank_sync.sync(rank_rows(run, s.live_rss))
        if "data" not in parts:
            return
        if run is None:
            self._set_static("run-header", Text(f"no run found under {s.target.path} yet (waiting)", style="dim"))
            self.rank_sync.sync([])
            for cid in ("chart-s", "chart-loss", "chart-mem"):
                self._w[cid].set_data([], [], [])
        else:
            h = run.header()
            lines = header_lines(h)
            t = Text()
            for i, line in enumerate(lines):
                if i:
                    t.append("\n")
                if i == 0:
                    word = f"[{h['status']}]"
                    a, _, b = line.partition(word)
                    t.append(a, style="bold")
                    t.append(word, style=STATUS_STYLES.get(h["status"], "bold"))
                    t.append(b, style="dim")
                elif line.startswith(("error:", "garbage", "incomplete", "summary synth")) or " | garbage" in line:
                    t.append(line, style="yellow")
                else:
                    t.append(line)
            self._set_static("run-header", t)
            self._rss_shown = dict(s.live_rss)
            self.rank_sync.sync(rank_rows(run, s.live_rss))
            rs = run.ranks.get(self.chart_rank) if self.chart_rank is not None else run.primary
            for cid, field_name in (("chart-s", "step_s"), ("chart-loss", "loss"), ("chart-mem", "gpu_mem_mib")):
                vals, warm, steps = series(rs, field_name)
                ch = self._w[cid]
                ch.title = {"chart-s": "s/it", "chart-loss": "loss", "chart-mem": "GPU mem (NVML, MiB)"}[cid] + \
                    (f" rank {rs.rank}" if rs is not None else "")
                ch.set_data(vals, warm, steps)

    def _gpu_brief(self) -> Text:
        s = self.session
        t = Text()
        g = s.gpu
        if g is None:
            t.append("GPU: not sampled yet", style="dim")
        elif g.unavailable:
            t.append(f"GPU metrics unavailable: {g.unavailable}", style="yellow")
        else:
            rows = gpu_rows(g, s.run, s.local_host)
            for i, (_, cells) in enumerate(rows):
                if i:
                    t.append("\n")
                t.append(f"GPU {cells['idx'].text} ", style="bold")
                for k in ("mem", "util", "power", "temp"):
                    t.append(cells[k].text, style=cells[k].style)
                    t.append("  ")
                t.append(cells["procs"].text, style="dim")
            if not rows:
                t.append("no GPUs", style="dim")
        return t

    def _render_sweep(self, parts: set[str] = frozenset({"data"})) -> None:
        tbl = self.session.table
        if tbl is None:
            self._set_static("sweep-header", Text("no sweep or run list for this target (a single run)",
                                                  style="dim"))
            self.sweep_sync.sync([])
            return
        label = SORTS[self.sort_index % len(SORTS)][0]
        self._set_static("sweep-header",
                         Text(counts_line(tbl) + f"  |  sorted by {label} (s)  |  enter: open run"))
        entries = sort_entries(tbl.entries, self.sort_index)
        self.sweep_sync.sync([(e.key, entry_row(e)) for e in entries])

    def _render_gpu(self, parts: set[str] = frozenset({"data", "hw"})) -> None:
        s = self.session
        g = s.gpu
        if g is None:
            self._set_static("gpu-status", Text("GPU: not sampled yet", style="dim"))
        elif g.unavailable:
            self._set_static("gpu-status", Text(f"GPU metrics unavailable: {g.unavailable}", style="yellow"))
        else:
            drv = f", driver {g.driver}" if g.driver else ""
            self._set_static("gpu-status", Text(f"{len(g.gpus)} GPU(s) via NVML{drv}; processes matched to ranks "
                                                f"by pid, else by device UUID"))
        self.gpu_sync.sync(gpu_rows(g, s.run, s.local_host) if g is not None else [])
        text, style = host_line(s.host)
        self._set_static("host-line", Text(text, style=style))
        self.rss_sync.sync(rss_rows(s.run, s.live_rss))

    # -- events
    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "rank-table" and event.row_key is not None and event.row_key.value is not None:
            r = int(event.row_key.value)
            if r != self.chart_rank:
                self.chart_rank = r
                if self.view == "run":
                    self._render_run({"data"})
                else:
                    self._mark(("run",), "data")

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id != "sweep-table" or event.row_key is None or event.row_key.value is None:
            return
        self.open_run(Path(event.row_key.value))

    def open_run(self, run_dir: Path) -> None:
        self.session.open_run(run_dir, pin=True)
        self.rank_sync.reset()
        self.chart_rank = None
        self._seen_run_version = -1
        self.session.poll(force_table=True)
        self.set_view("run")

    # -- actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("next_view", "sort", "pause", "follow") and len(self.screen_stack) > 1:
            return False     # let the help screen / command palette have those keys
        return True

    def set_view(self, view: str) -> None:
        self.view = view
        self._w["views"].current = f"{view}-view"
        self._render_all()
        tid = {"run": "rank-table", "sweep": "sweep-table", "gpu": "gpu-table"}[view]
        self._w[tid].focus()

    def action_next_view(self) -> None:
        self.set_view(VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)])

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self.session.poll()
            self._render_all(force=True)
        self._render_topbar()
        self.notify("paused" if self.paused else "resumed", timeout=2)

    def action_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(SORTS)
        if self.view == "sweep":
            self._render_sweep()
        else:
            self._mark(("sweep",), "data")
        self.notify(f"sweep table sorted by {SORTS[self.sort_index][0]}", timeout=2)

    def action_follow(self) -> None:
        self.session.follow()
        self.session.poll()
        self._render_all(force=True)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def export_data(self) -> dict[str, Any]:
        data = self.session.export(self.view)
        if self.view == "sweep":
            data["sort"] = SORTS[self.sort_index][0]
        data["paused"] = self.paused
        return data

    def action_export_json(self) -> None:
        data = self.export_data()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.export_dir.mkdir(parents=True, exist_ok=True)
        path = self.export_dir / f"sftbench-monitor-{self.view}-{stamp}.json"
        n = 1
        while path.exists():
            path = self.export_dir / f"sftbench-monitor-{self.view}-{stamp}-{n}.json"
            n += 1
        path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        self.last_export = path
        self.notify(f"exported {self.view} view to {path}", title="Export view as JSON")
