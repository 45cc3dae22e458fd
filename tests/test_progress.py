"""ayt.progress: plain periodic lines with rate and ETA off a terminal, a tqdm bar on one."""
import io
import re

import pytest

from ayt.progress import Progress, counting, fmt_time, progress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_rate_eta_and_interval(monkeypatch):
    monkeypatch.delenv("AYT_PROGRESS", raising=False)
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(1000, "[job]", "img", interval=10, stream=out, clock=clock)
    assert bar.mode == "plain"  # a StringIO is not a terminal
    lines = out.getvalue().splitlines()
    assert lines == ["[job] 0/1000 img (0%) | -- img/s | eta --"]  # the start line, at once
    for _ in range(9):  # 9 s, 50 img/s: inside the interval, nothing new
        clock.t += 1
        bar.update(50)
    assert len(out.getvalue().splitlines()) == 1
    clock.t += 1
    bar.note("it 500 1step run 1/3")
    bar.update(50)  # 10 s, 500 images: one line with the rate and the ETA
    lines = out.getvalue().splitlines()
    assert lines[-1] == "[job] 500/1000 img (50%) | it 500 1step run 1/3 | 50 img/s | eta 0m10s"
    clock.t += 5
    bar.update(250)  # 5 s after the last line: nothing
    assert len(out.getvalue().splitlines()) == 2
    clock.t += 5
    bar.update(250)
    bar.close()
    bar.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("[job] 1000/1000 img (100%)") and "eta 0m00s" in lines[2]
    assert lines[3] == "[job] 1000/1000 img (100%) | it 500 1step run 1/3 | 50 img/s | done in 0m20s"


def test_unknown_total_and_wrappers(monkeypatch):
    monkeypatch.delenv("AYT_PROGRESS", raising=False)
    clock, out = FakeClock(), io.StringIO()
    bar = Progress(None, "[stats]", "img", stream=out, clock=clock)
    fn = counting(lambda i, size: [i] * size, bar, scale=2)  # rank 0 of 2 draws half the batches
    assert fn(3, 4) == [3] * 4 and bar.n == 8
    clock.t += 2
    bar.close()
    assert out.getvalue().splitlines()[-1] == "[stats] 8 img | 4 img/s | done in 0m02s"
    out = io.StringIO()
    assert list(progress(range(3), desc="[loop]", unit="step", stream=out, clock=clock)) == [0, 1, 2]
    assert out.getvalue().splitlines()[0].startswith("[loop] 0/3 step")
    assert out.getvalue().splitlines()[-1].startswith("[loop] 3/3 step (100%)")


def test_tty_uses_tqdm(monkeypatch):
    monkeypatch.delenv("AYT_PROGRESS", raising=False)
    from tqdm import tqdm
    out = Tty()
    bar = Progress(10, "[job]", "img", stream=out)
    assert bar.mode == "bar" and isinstance(bar._bar, tqdm)
    bar.update(5)
    bar.write("a message")
    bar.update(5)
    bar.close()
    text = out.getvalue()
    assert "a message" in text and re.search(r"\[job\]: 100%\|.*\| 10/10", text)


def test_modes_from_environment_and_rank(monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv("AYT_PROGRESS", "off")
    bar = Progress(10, "[job]", stream=out)
    bar.update(10)
    bar.close()
    assert bar.mode == "off" and out.getvalue() == ""
    monkeypatch.setenv("AYT_PROGRESS", "plain")
    assert Progress(1, "[job]", stream=Tty()).mode == "plain"
    monkeypatch.setenv("AYT_PROGRESS", "loud")
    with pytest.raises(ValueError, match="AYT_PROGRESS"):
        Progress(1, "[job]", stream=out)
    monkeypatch.delenv("AYT_PROGRESS")
    monkeypatch.setenv("RANK", "1")  # torchrun rank 1: silent
    assert Progress(1, "[job]", stream=Tty()).mode == "off"


def test_fmt_time():
    assert (fmt_time(0), fmt_time(61.9), fmt_time(3600 * 2 + 5 * 60)) == ("0m00s", "1m01s", "2h05m")
