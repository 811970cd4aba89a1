"""The trainer's seq2seq eval end to end: the translate experiment's smoke run scores BLEU / chrF
by decoding padded sources, and its generate function ignores how far a source is padded."""

import math
import os

import numpy as np
import pytest

from attn import decode, models, train
from attn.train import tasks
from launch import sweep


@pytest.mark.slow  # ~80 s of CPU: a train step, an eval step and four decoding programs.
def test_translate_eval_decodes_padded_sources_like_unpadded_ones(data_dir, tmp_path,
                                                                  monkeypatch):
  module, _ = sweep.load_experiment(os.path.join(sweep.REPO, "experiments", "translate.py"))
  config = module.get_config("runlocal")
  config.data.data_dir = data_dir
  config.train.update(num_steps=2, eval_every=0, checkpoint_every=0, progress_bar=False)
  seen = {}
  extra_eval = tasks.Seq2SeqTask.extra_eval

  def spy(self, generate_fn, batches):
    seen.update(generate=generate_fn, batches=list(batches))
    return extra_eval(self, generate_fn, seen["batches"])

  def keep_state(step, state, ckpt):
    seen["params"] = state.params

  monkeypatch.setattr(tasks.Seq2SeqTask, "extra_eval", spy)
  metrics = train.train_and_evaluate(config, str(tmp_path), hooks=[keep_state])
  assert math.isfinite(metrics["bleu"]) and math.isfinite(metrics["chrf"])

  batch = seen["batches"][0]
  sources = np.where(batch["inputs_segment_ids"] == 1, batch["inputs"], 0)
  lengths = (sources != 0).sum(axis=1)
  valid = batch["weights"].any(axis=1)
  assert lengths[valid].min() < sources.shape[1]  # the scored sources are padded
  generate = seen["generate"]  # the trainer's, as BLEU / chrF used it
  out = np.asarray(generate(sources))
  # The same sources padded only to the longest of them.
  np.testing.assert_array_equal(np.asarray(generate(sources[:, :lengths.max()])), out)
  # The shortest source alone, without any padding.
  row = int(np.argmin(np.where(valid, lengths, sources.shape[1])))
  alone = np.asarray(generate(sources[row:row + 1, :lengths[row]]))
  np.testing.assert_array_equal(alone[0], out[row])
  # Attending to the padding (no id is padding) decodes other tokens: this test can fail.
  model = models.build(models.ModelConfig.from_config(config.model))
  attended = np.asarray(decode.generate(model, seen["params"], sources, pad_id=-1,
                                        max_new_tokens=out.shape[1], eos_id=2, bos_id=1))
  assert (attended[valid] != out[valid]).any()
