"""--eval_steps=0 scores every example exactly once when hosts' shares of the eval split differ.

49 examples of a 5-file TFDS split read by 2 input pipelines (InputContext, 2 hosts of 2 replicas
each), global batch 8: the hosts' shares are 24 and 25 examples; ceil(49 / 8) = 7 steps of one
batch would stop both early. Every
host yields the same number of (padded) batches, a multiple of its replicas, and the evaluator
counts only the valid rows."""

import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import helpers
from tf_simclr import config as cfg
from tf_simclr.data import datasets, pipeline
from tf_simclr.models import simclr
from tf_simclr.evaluation import evaluate


# 50 8x8 RGB images (pixel value 5 * index) in 5 files, 5 classes.
TinyFiveFileDataset = helpers.tiny_tfds_builder(
    'TinyFiveFileDataset', {'test': 50}, (8, 8, 3), 5,
    lambda split, i: (np.full((8, 8, 3), i * 5, np.uint8), i % 5))


@pytest.fixture(scope='module')
def five_files(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinyFiveFileDataset(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=5))
  return datasets.resolve_dataset('tiny_five_file_dataset', data_dir=data_dir)


def test_eval_until_exhausted_scores_each_hosts_whole_share(five_files):
  source = five_files
  data = cfg.DataConfig(dataset='tiny_five_file_dataset', eval_split='test', image_size=8)
  model_config = cfg.model_config('finetune', 8, resnet_depth=18, width_multiplier=0.125)
  model = simclr.build_model(model_config, 5).build_for_size(8)
  evaluator = evaluate.Evaluator(model, tf.distribute.get_strategy(), [], 0.0)
  global_batch, hosts, local = 8, 2, 2
  per_replica = global_batch // (hosts * local)
  split = 'test[:49]'
  old_steps = math.ceil(source.num_examples(split) / global_batch)
  counts, capped, num_batches = [], [], []
  for host in range(hosts):
    context = tf.distribute.InputContext(num_input_pipelines=hosts, input_pipeline_id=host,
                                         num_replicas_in_sync=hosts * local)
    dataset = pipeline.make_feature_dataset(source, data, split, per_replica,
                                            input_context=context)
    batches = list(dataset)
    share = sum(int(valid.numpy().sum()) for *_, valid in batches)
    num_batches.append(len(batches))
    counts.append(int(evaluator.evaluate(dataset, 0)['num_examples']))
    capped.append(int(evaluator.evaluate(dataset, old_steps)['num_examples']))
    assert counts[-1] == share
  assert sorted(counts) == [24, 25]  # every example once
  assert num_batches[0] == num_batches[1] and num_batches[0] % local == 0  # equal, whole rounds
  assert num_batches[0] == local * math.ceil(math.ceil(max(counts) / per_replica) / local)
  assert sum(capped) < 49  # what a fixed step count of single-replica batches would have scored
