"""Progress bars: quiet when stderr is not a terminal, log lines still shown; synthetic writing counts
samples."""

from __future__ import annotations

from data_pipeline.progress import Progress


def test_progress_bar_is_quiet_when_stderr_is_not_a_terminal(capsys):
    with Progress(10, "work") as bar:  # pytest's captured stderr is not a terminal
        bar.update(10)
        bar.write("shard-000000.tar: 10 samples")  # log lines still reach stderr
    with Progress(3, "shown", enabled=True) as bar:  # forced on: a bar with its total
        bar.update(3)
        bar.write("a line beside the bar")
    captured = capsys.readouterr()
    assert "work" not in captured.err and "shard-000000.tar: 10 samples" in captured.err
    assert "shown" in captured.err and "/3" in captured.err and "a line beside the bar" in captured.err
    assert captured.out == ""  # nothing on stdout, which belongs to the command's result


def test_synthetic_writing_reports_every_sample(tmp_path):
    from data_pipeline.synthetic import write_synthetic_dataset

    seen = []
    write_synthetic_dataset(str(tmp_path), n_pairs=5, n_text=4, n_images=3, n_eval=2, samples_per_shard=2,
                            image_size=16, progress=seen.append)
    assert sum(seen) == 5 + 4 + 3 + 2
