"""Progress of long jobs: a tqdm bar on a terminal, plain periodic lines everywhere else.

Every job that can run longer than a few seconds (evaluation, evaluator training, reference
statistics, sampling, the study driver) reports through one `Progress`:

    with Progress(total=n, desc="[eval mini-ayt]", unit="img") as bar:
        for ...:
            bar.note("it 500 1step run 1/3")   # what is being done now (shown beside the counts)
            bar.update(batch_size)

    for step in progress(range(steps), desc="[evaluator]", unit="step"): ...

Modes (argument `mode`, else the environment variable AYT_PROGRESS, else automatic):
  bar    a tqdm bar on the stream (automatic when the stream is a terminal);
  plain  one line at the start, then at most one line every `interval` seconds, and one at the end,
         each with done/total, rate and ETA (automatic when output goes to a file or pipe: papermill,
         CI, nohup, a study's log files), e.g.
             [eval mini-ayt] 6000/20000 img (30%) | it 500 2step run 1/1 | 412 img/s | eta 34s
  off    nothing (automatic on ranks other than 0 under torchrun).
Lines go to stderr by default, so stdout stays clean for a command's results.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TextIO, TypeVar

MODES = ("bar", "plain", "off")
DEFAULT_INTERVAL = 20.0  # seconds between plain lines

T = TypeVar("T")


def fmt_time(s: float) -> str:
    """Seconds as '4m07s' or '2h05m'."""
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_count(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:.4g}"


def _fmt_rate(r: float) -> str:
    return f"{r:.0f}" if r >= 100 else f"{r:.3g}"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_mode(mode: Optional[str], stream: TextIO) -> str:
    """The mode a job uses: the argument, else $AYT_PROGRESS, else bar on a terminal / plain otherwise."""
    mode = mode or os.environ.get("AYT_PROGRESS") or None
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode {mode!r} (argument or $AYT_PROGRESS): expected one of {MODES}")
    if not _is_main_process():
        return "off"
    if mode is None:
        isatty = getattr(stream, "isatty", None)
        mode = "bar" if isatty is not None and isatty() else "plain"
    return mode


class Progress:
    """Progress of one job of `total` units (None: unknown total, no ETA).

    update(n): n more units done. note(text): what is being done now. write(msg): a message that does
    not break the bar. close(): the final line (also on `with` exit). `clock` (monotonic seconds) and
    `stream` are injectable for tests.
    """

    def __init__(self, total: Optional[float], desc: str, unit: str = "it", *, interval: float = DEFAULT_INTERVAL,
                 mode: Optional[str] = None, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, float(interval)
        self.stream = stream if stream is not None else sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.clock = clock
        self.n = 0.0
        self.text = ""
        self.closed = False
        self.t0 = self.last = clock()
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True,
                             unit_scale=False, mininterval=0.5)
        elif self.mode == "plain":
            self._line()

    # -- reporting ---------------------------------------------------------------------------------
    def update(self, n: float = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain":
            now = self.clock()
            if now - self.last >= self.interval:
                self.last = now
                self._line()

    def note(self, text: str) -> None:
        self.text = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        elif self.mode == "plain":
            print(msg, file=self.stream, flush=True)

    def writer(self, log: Callable[..., None] = print) -> Callable[..., None]:
        """`log` made safe to call while a bar is shown (the bar is cleared and redrawn around it)."""
        if self._bar is None:
            return log

        def write(*args, **kw):
            with self._bar.external_write_mode():
                log(*args, **kw)
        return write

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain":
            self._line(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plain lines --------------------------------------------------------------------------------
    def rate(self) -> Optional[float]:
        """Units per second since the start (None before any time has passed)."""
        dt = self.clock() - self.t0
        return self.n / dt if dt > 0 and self.n > 0 else None

    def eta(self) -> Optional[float]:
        r = self.rate()
        if self.total is None or r is None:
            return None
        return max(self.total - self.n, 0) / r

    def format_line(self, final: bool = False) -> str:
        done = fmt_count(self.n)
        if self.total is not None:
            pct = min(100.0 * self.n / self.total, 100.0) if self.total else 100.0
            done += f"/{fmt_count(self.total)} {self.unit} ({math.floor(pct):.0f}%)"
        else:
            done += f" {self.unit}"
        parts = [f"{self.desc} {done}"]
        if self.text:
            parts.append(self.text)
        r = self.rate()
        parts.append(f"{_fmt_rate(r)} {self.unit}/s" if r is not None else f"-- {self.unit}/s")
        if final:
            parts.append(f"done in {fmt_time(self.clock() - self.t0)}")
        else:
            e = self.eta()
            parts.append(f"eta {fmt_time(e)}" if e is not None else "eta --")
        return " | ".join(parts)

    def _line(self, final: bool = False) -> None:
        print(self.format_line(final), file=self.stream, flush=True)


def progress(iterable: Iterable[T], total: Optional[float] = None, desc: str = "", unit: str = "it",
             **kw) -> Iterator[T]:
    """Iterate `iterable`, reporting one unit per item (total: len(iterable) when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, unit, **kw) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def counting(fn: Callable[[int, int], T], bar: Progress, scale: int = 1) -> Callable[[int, int], T]:
    """A sample_fn(batch_index, size) that reports `scale * size` units to `bar` after each batch
    (scale: the number of processes drawing batches alike, so rank 0's bar shows the total)."""
    def wrapped(index: int, size: int) -> T:
        out = fn(index, size)
        bar.update(scale * size)
        return out
    return wrapped
