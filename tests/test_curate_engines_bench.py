"""benchmarks/curate_engines: a single-process filter that passes --rss-limit-gb is stopped and reported,
not left to take the machine's memory; within the limit it finishes and keeps what the rules keep."""
import json

from benchmarks import curate_engines as ce


def test_a_filter_over_the_memory_limit_is_stopped_and_reported(tmp_path, capsys):
    pool = str(tmp_path / "pool")
    assert ce.main(["--rows", "3000", "--per-table", "1000", "--dim", "16", "--engine", "local", "--pool", pool,
                    "--rss-limit-gb", "0.03"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["finished"] is False and row["killed_at_rss_mb"] > 0.03 * 1024
    assert ce.main(["--rows", "3000", "--per-table", "1000", "--dim", "16", "--engine", "local", "--pool", pool]) == 0
    row = json.loads(capsys.readouterr().out)
    # boilerplate, small images, copies and the bottom half of the scores go: about 28 % stays, as at 1M
    assert 0.15 * 3000 < row["decisions_kept"] < 0.45 * 3000
    assert ce.repeat_flags(10_000_000) == ["--max-caption-repeats", "10000"]
    assert ce.repeat_flags(200_000) == ["--max-caption-repeats", "1000"]
