"""Multi-worker start-up without a cluster: only the chief prepares TFDS data, the others wait
for its outcome (a fake exchange stands for the coordination service)."""

import pytest

from tf_simclr.data import tfds_prepare
from tf_simclr.errors import DatasetError


class FakeBuilder:
  """What tfds_prepare.prepare touches of a TFDS builder; counts download_and_prepare calls."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = None
  url_infos = None

  def __init__(self, prepared=False, fails=None):
    self.data_dir_root = '/data'
    self.prepared, self.fails, self.calls = prepared, fails, 0

  def is_prepared(self):
    return self.prepared

  def download_and_prepare(self):
    self.calls += 1
    if self.fails:
      raise self.fails
    self.prepared = True


class FakeExchange:
  """The chief's published values, shared by every 'worker' of one test."""

  def __init__(self, chief, board):
    self.chief, self.multi_worker, self.board, self.waits = chief, True, board, []

  def publish(self, key, value):
    assert self.chief
    self.board[key] = value

  def wait(self, key, timeout_s, what):
    assert not self.chief
    self.waits.append((key, timeout_s, what))
    return self.board[key]


def test_only_the_chief_prepares_and_the_others_wait_for_it():
  board = {}
  chief, other = FakeBuilder(), FakeBuilder()
  assert tfds_prepare.chief_prepares(FakeExchange(True, board))(chief, 'cifar10') is chief
  other.prepared = True  # The chief's files, seen through the shared data_dir.
  worker = FakeExchange(False, board)
  assert tfds_prepare.chief_prepares(worker, timeout_s=7)(other, 'cifar10') is other
  assert (chief.calls, other.calls) == (1, 0)
  assert worker.waits == [('tfds_prepared/cifar10', 7, 'preparing --dataset=cifar10 in /data')]


def test_a_chief_that_cannot_prepare_stops_the_others_with_its_error():
  board = {}
  chief = FakeBuilder(fails=RuntimeError('disk full'))
  with pytest.raises(DatasetError, match='could not be prepared in /data'):
    tfds_prepare.chief_prepares(FakeExchange(True, board))(chief, 'cifar10')
  other = FakeBuilder()
  with pytest.raises(DatasetError, match=r'chief of this multi-worker run could not prepare '
                     r'--dataset=cifar10 in /data; stopping this worker too.*disk full'):
    tfds_prepare.chief_prepares(FakeExchange(False, board))(other, 'cifar10')
  assert other.calls == 0


def test_a_single_worker_prepares_itself():
  builder = FakeBuilder()
  exchange = FakeExchange(False, {})
  exchange.multi_worker = False
  assert tfds_prepare.chief_prepares(exchange)(builder, 'cifar10') is builder
  assert builder.calls == 1 and exchange.waits == []
