"""The check behind every "one clear error line" test of a `kslm` subprocess."""


def one_line_error(proc, *names) -> str:
    """Exit code 2, no traceback, exactly one `kslm: error:` line, naming each of `names`; returns that line."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kslm: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]
