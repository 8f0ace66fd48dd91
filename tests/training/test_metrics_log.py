"""The metrics CSV: a resumed run keeps the rows up to its checkpoint, and a lost file starts again with a header."""

from training.metrics_log import MetricsLog


def test_a_resume_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in (10, 20, 30):
        log.log(step, {"loss": 3.0 - step / 10})
    MetricsLog(tmp_path, resume_step=20, tensorboard=False).log(30, {"loss": 0.5})
    assert MetricsLog.series(tmp_path / "metrics.csv", "loss") == [(10, 2.0), (20, 1.0), (30, 0.5)]


def test_metrics_csv_gets_its_header_when_missing_on_resume(tmp_path):
    log = MetricsLog(tmp_path, resume_step=40, tensorboard=False)
    log.log(41, {"loss": 1.5})
    log.close()
    assert MetricsLog.series(tmp_path / "metrics.csv", "loss") == [(41, 1.5)]
