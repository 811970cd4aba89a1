"""attn.train.evaluate.Evaluator: sums over the eval batches against float64 NumPy, the batch
limit, a stop request mid-eval, and the host batches every task's extra_eval receives."""

import dataclasses
import types

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from attn.data import DataInfo
from attn.train.evaluate import Evaluator
from attn.train.tasks import LMTask

B, T, V = 8, 4, 5
STATE = types.SimpleNamespace(params={})  # What the evaluator passes through to eval_fn.


def _info() -> DataInfo:
  return DataInfo(name="fake", task="lm", vocab_size=V, pad_id=0, bos_id=1, eos_id=2,
                  seq_len=T, target_len=T, num_classes=None, image_shape=None, batch_size=B,
                  global_batch_size=B, train_examples=0, eval_examples=0)


@dataclasses.dataclass(frozen=True)
class RecordingTask(LMTask):
  """An LM task whose extra_eval reports what it was given."""

  seen: list = dataclasses.field(default_factory=list, compare=False)

  def extra_eval(self, generate_fn, batches):
    self.seen.extend(batches)
    return {"decoded_batches": float(len(batches))}


def _batches(n: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)
  return [{"logits": rng.normal(size=(B, T, V)).astype(np.float32),
           "targets": rng.integers(0, V, size=(B, T)).astype(np.int32),
           "weights": (rng.random((B, T)) < 0.7).astype(np.float32)} for _ in range(n)]


def _evaluator(task, batches, **kwargs) -> tuple[Evaluator, list[int]]:
  calls = []

  def eval_fn(state, batch):
    calls.append(1)
    return task.stats(batch["logits"], batch)

  def eval_iters(num_batches=None):
    yield from batches[:num_batches]

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  return Evaluator(task, None, eval_fn, eval_iters, sharding, **kwargs), calls


def _reference(batches) -> dict[str, float]:
  """Weighted cross entropy and accuracy in float64 over all rows of all batches."""
  loss = correct = weight = 0.0
  for b in batches:
    logits = b["logits"].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
    loss += np.sum((log_z - picked) * b["weights"])
    correct += np.sum((logits.argmax(-1) == b["targets"]) * b["weights"])
    weight += np.sum(b["weights"])
  return {"loss": loss / weight, "accuracy": correct / weight}


def test_metrics_are_the_weighted_means_over_the_first_num_batches():
  batches = _batches(5)
  task = RecordingTask(info=_info())
  evaluate, _ = _evaluator(task, batches, num_batches=3, decode_batches=2)
  metrics = evaluate(STATE)
  want = _reference(batches[:3])
  np.testing.assert_allclose(metrics["loss"], want["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], want["accuracy"], rtol=1e-6)
  np.testing.assert_allclose(metrics["perplexity"], np.exp(want["loss"]), rtol=1e-5)
  # The task's extras got the first decode_batches host batches, unplaced NumPy.
  assert metrics["decoded_batches"] == 2.0
  assert [b is o for b, o in zip(task.seen, batches, strict=False)] == [True, True]
  # The whole split when num_batches is None; a plain LM task adds no extras.
  plain, _ = _evaluator(LMTask(info=_info()), batches, decode_batches=2)
  whole = plain(STATE)
  np.testing.assert_allclose(whole["loss"], _reference(batches)["loss"], rtol=1e-5)
  assert set(whole) == {"loss", "accuracy", "perplexity", "bits_per_token"}


def test_a_stop_request_ends_the_eval_with_none():
  batches = _batches(4)
  evaluate, calls = _evaluator(RecordingTask(info=_info()), batches)
  asked = []

  def should_stop():
    asked.append(1)
    return len(asked) > 2  # Stop before the third batch.

  assert evaluate(STATE, should_stop) is None
  assert len(calls) == 2  # The two batches before the stop.
  empty, _ = _evaluator(RecordingTask(info=_info()), [])
  assert empty(STATE) == {}
