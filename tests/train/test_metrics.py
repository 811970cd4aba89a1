"""attn.train.metrics.MetricWriter: plain log lines without the bar, TensorBoard on resume."""

import os
import re
import struct

import pytest
from tensorboardX.proto import event_pb2

from attn.train import metrics


def read_events(logdir):
  """Every event of every file, files in TensorBoard's (name) order; TFRecord framing."""
  events = []
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
  return events


def shown_scalars(events, tag):
  """step -> value as TensorBoard shows it: a SessionLog START at step s hides the events
  with step >= s read before it (tensorboard's EventAccumulator._CheckForRestartAndMaybePurge)."""
  shown = {}
  for event in events:
    if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
      shown = {s: v for s, v in shown.items() if s < event.step}
    for value in event.summary.value:
      if value.tag == tag:
        assert event.step not in shown, f"step {event.step} shown twice"
        shown[event.step] = value.simple_value
  return shown


def test_resume_shows_each_step_once_and_the_config(tmp_path):
  workdir = str(tmp_path)
  first = metrics.MetricWriter(workdir, total_steps=12, progress_bar=False, config_text="a: 1")
  for step in range(1, 11):  # Logged up to step 10; the last checkpoint was step 6.
    first.write(step, "train", {"loss": float(step)})
  first.close()
  resumed = metrics.MetricWriter(workdir, total_steps=12, initial_step=6, progress_bar=False,
                                 config_text="a: 1\nb: 2")
  for step in range(7, 13):
    resumed.write(step, "train", {"loss": 100.0 + step})
  resumed.close()
  events = read_events(os.path.join(workdir, "tensorboard"))
  expected = {s: float(s) for s in range(1, 7)} | {s: 100.0 + s for s in range(7, 13)}
  assert shown_scalars(events, "train/loss") == expected
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 2  # Nothing overwritten.
  texts = [(e.step, v.tensor.string_val[0].decode()) for e in events for v in e.summary.value
           if v.tag.startswith("config")]
  assert texts == [(0, "    a: 1"), (6, "    a: 1\n    b: 2")]
  # metrics.jsonl agrees: step <= 6 from the first run, the rest from the resumed one.
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert {r["step"]: r["loss"] for r in rows} == expected and len(rows) == 12


def test_tensorboard_itself_reads_the_resumed_run(tmp_path):
  """The same with TensorBoard's own loader (the `dev` extra installs it)."""
  accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  workdir = str(tmp_path)
  for initial, values in ((0, range(1, 9)), (4, range(5, 11))):
    writer = metrics.MetricWriter(workdir, total_steps=10, initial_step=initial,
                                  progress_bar=False, config_text="x")
    for step in values:
      writer.write(step, "train", {"loss": float(step + 10 * initial)})
    writer.close()
  acc = accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  acc.Reload()
  shown = [(e.step, e.value) for e in acc.Scalars("train/loss")]
  assert shown == [(s, float(s)) for s in range(1, 5)] + [(s, s + 40.0) for s in range(5, 11)]


def test_plain_log_line_when_the_bar_is_off(tmp_path, capsys):
  writer = metrics.MetricWriter(str(tmp_path), total_steps=100, initial_step=20,
                                progress_bar=False)
  writer._started = (metrics.time.monotonic() - 30.0, 20)  # Started 30 s ago at step 20.
  writer.progress(30, {"loss": 3.21456, "tok/s": 12345.6})
  writer.close()
  line = capsys.readouterr().err.strip()
  # 10 steps in 30 s, 70 to go: 210 s.
  assert line == "step 30/100: loss 3.215, tok/s 1.235e+04, eta 3m30s"
  assert re.fullmatch(r"\d+m\d\ds", metrics._duration(95.4)) and metrics._duration(3725) == "1h02m"


def test_throughput_meter_times_steps_only(monkeypatch):
  """The first step (compilation) and paused host work (evals, logs) are not step time."""
  now = [100.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
  meter = metrics.ThroughputMeter(tokens_per_step=512)
  meter.step({})  # Step 1 finishes at t=100 after a long compile: the clock starts here.
  with meter.paused({}):  # A log right after step 1: nothing timed yet.
    assert meter.rates() == {} and meter.steps_per_second is None
  for _ in range(4):  # Steps 2-5, half a second each.
    now[0] += 0.5
    meter.step({})
  with meter.paused({}):
    assert meter.rates() == {"steps_per_second": 2.0, "tokens_per_second": 1024.0}
    now[0] += 60.0  # An eval: not counted.
  now[0] += 2.0  # Step 6 takes two seconds.
  meter.step({})
  with meter.paused({}):
    pass
  assert (meter.steps, meter.seconds) == (5, 4.0)
  assert meter.steps_per_second == 1.25 and meter.rates()["tokens_per_second"] == 640.0
