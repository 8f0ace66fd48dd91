"""The metrics CSV: a resumed run keeps the rows up to its checkpoint, and a lost file starts again with a header."""

from training.metrics_log import MetricsLog


def test_a_resume_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in (10, 20, 30):
        log.log(step, {"loss": 3.0 - step / 10})
    MetricsLog(tmp_path, resume_step=20, tensorboard=False).log(30, {"loss": 0.5})
    assert MetricsLog.series(tmp_path / "metrics.csv", "loss") == [(10, 2.0), (20, 1.0), (30, 0.5)]


def test_a_rerun_finished_run_writes_its_final_metrics_once(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log(20, {"loss": 1.0})
    log.replace(20, {"zeroshot_top1": 0.2})
    again = MetricsLog(tmp_path, resume_step=20, tensorboard=False)  # the rerun resumes at the last step
    again.replace(20, {"zeroshot_top1": 0.25})
    rows = MetricsLog.read(tmp_path / "metrics.csv")
    assert [(r["step"], r["metric"], r["value"]) for r in rows] == [("20", "loss", "1.0"), ("20", "zeroshot_top1", "0.25")]


def test_metrics_csv_gets_its_header_when_missing_on_resume(tmp_path):
    log = MetricsLog(tmp_path, resume_step=40, tensorboard=False)
    log.log(41, {"loss": 1.5})
    log.close()
    assert MetricsLog.series(tmp_path / "metrics.csv", "loss") == [(41, 1.5)]


def test_a_row_cut_short_by_a_kill_is_skipped(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.log(1, {"loss": 2.5})
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("2,loss")  # the kill came mid-row
    assert MetricsLog.series(tmp_path / "metrics.csv", "loss") == [(1, 2.5)]
    MetricsLog(tmp_path, resume_step=1, tensorboard=False).log(2, {"loss": 2.0})
    assert MetricsLog.series(tmp_path / "metrics.csv", "loss") == [(1, 2.5), (2, 2.0)]


def test_tensorboard_keeps_the_checkpoint_steps_events_on_resume(tmp_path):
    """The CSV keeps rows up to the resume step, and so does TensorBoard: it purges from the step after
    (purge_step=resume_step + 1), so the checkpoint step's own events stay."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log.close()
    resumed = MetricsLog(tmp_path, resume_step=2)
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_fresh_start_keeps_no_tensorboard_events_of_the_attempt_before(tmp_path):
    """A run killed before its first checkpoint and run again reset the CSV but left the old events file
    beside the new one: the curves held both attempts' steps 1, 2, ..."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)
    for step in (1, 2):
        log.log(step, {"loss": float(step)})
    log.close()
    again = MetricsLog(tmp_path)
    again.log(1, {"loss": 10.0})
    again.close()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 10.0)]
