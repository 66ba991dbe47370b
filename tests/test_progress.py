"""The one progress helper: plain periodic lines off a terminal, silent when disabled, rate and final line."""

from vlpet_cli.progress import Progress


def test_plain_lines_at_the_end_and_when_due(capsys):
    bar = Progress(3, every_s=3600)
    bar.advance(1, "first")
    bar.advance(1, "second")
    assert capsys.readouterr().out == ""  # not due yet
    bar.advance(1, "third")
    bar.close()
    assert capsys.readouterr().out == "[3/3] third\n"  # the end is always shown, once


def test_due_lines_use_the_given_format_on_stderr(capsys):
    bar = Progress(10, every_s=0, stderr=True, line=lambda p: f"x {p.completed}/{p.total} {p.description}")
    bar.advance(4, "a", count=8)
    assert capsys.readouterr().err == "x 4/10 a\n"
    assert bar.counted == 8 and bar.rate() > 0


def test_close_shows_a_position_not_yet_shown_unless_told_not_to(capsys):
    bar = Progress(10, every_s=3600)
    bar.advance(2, "half way")
    bar.close()
    assert capsys.readouterr().out == "[2/10] half way\n"
    quiet = Progress(10, every_s=3600, final_line=False)
    quiet.advance(2, "paused")
    quiet.close()
    assert capsys.readouterr().out == ""


def test_disabled_is_silent(capsys):
    with Progress(2, enabled=False, every_s=0) as bar:
        bar.advance(2, "done")
        bar.print("hello")
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""


def test_starting_part_way_counts_from_there(capsys):
    bar = Progress(5, done=3, every_s=3600)
    bar.update(5, "resumed")
    assert capsys.readouterr().out == "[5/5] resumed\n"


def test_plain_lines_show_an_eta_until_the_end(capsys, monkeypatch):
    clock = iter([100.0, 110.0, 110.0, 130.0, 130.0, 130.0, 130.0])
    monkeypatch.setattr("vlpet_cli.progress.time.perf_counter", lambda: next(clock))
    bar = Progress(4, every_s=0)  # started at t=100
    bar.advance(1, "epoch 1/2")  # t=110: 1 of 4 in 10 s, 3 left
    assert capsys.readouterr().out == "[1/4] epoch 1/2 | ETA 0:30\n"
    bar.advance(3, "epoch 2/2")  # complete: no ETA
    assert capsys.readouterr().out == "[4/4] epoch 2/2\n"
