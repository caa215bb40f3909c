import json

from resstream.telemetry import MetricsLog, read_log


def test_a_torn_last_line_is_left_out_and_truncated_away(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    records = [{"step": step, "loss": 5.0 - step} for step in range(1, 5)]
    for record in records:
        log.write(record)
    with log.path.open("a") as f:  # a run killed mid-write
        f.write(json.dumps({"step": 5, "loss": 0.5})[:9])
    assert read_log(tmp_path) == records
    log.truncate_after(2)
    lines = log.path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == records[:2]
    log.truncate_after(10)  # nothing torn left to drop
    assert read_log(tmp_path) == records[:2]
