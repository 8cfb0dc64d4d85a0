"""TFDS `download_and_prepare` with errors a user can act on.

A dataset that needs a manual download (ImageNet) names the folder to put its files in; one that
needs the network fails in seconds when none of its download hosts answers (instead of after
TFDS's minutes of retries), with how to prepare it elsewhere and copy it over.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
import urllib.parse
from typing import Callable, Optional

import tensorflow as tf
import tensorflow_datasets as tfds

from tf_simclr.errors import DatasetError

log = logging.getLogger(__name__)

# How long the other workers of a multi-worker run wait for the chief to prepare a dataset
# (ImageNet takes hours); the wait ends early when the chief fails or dies.
CHIEF_PREPARE_WAIT_S = 6 * 3600.0
_PREPARED = 'ok'


def _is_network_error(error: Optional[BaseException]) -> bool:
  """True if error (or anything in its cause chain) is a connection/download failure."""
  network = (ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError,
             tfds.download.DownloadError)
  try:
    import requests  # pylint: disable=g-import-not-at-top
    network += (requests.exceptions.RequestException,)
  except ImportError:
    pass
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, network):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


_PROXY_VARS = ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy', 'ALL_PROXY',
               'all_proxy')


def _unreachable_download_hosts(builder, timeout: float = 5.0) -> Optional[str]:
  """The download hosts of `builder`, when none of them answers a TCP connect; else None.

  A quick probe so that a machine without network fails in seconds instead of after TFDS's
  minutes of retries. Skipped (None) behind a proxy or when the builder lists no URLs.
  """
  if any(os.environ.get(v) for v in _PROXY_VARS):
    return None
  try:
    urls = list(builder.url_infos or {})
  except Exception:  # pylint: disable=broad-except
    return None
  hosts = []
  for url in urls:
    parsed = urllib.parse.urlparse(url)
    if parsed.hostname and (parsed.hostname, parsed.port, parsed.scheme) not in hosts:
      hosts.append((parsed.hostname, parsed.port, parsed.scheme))
  if not hosts:
    return None
  for host, port, scheme in hosts[:3]:
    try:
      socket.create_connection((host, port or (443 if scheme == 'https' else 80)),
                               timeout=timeout).close()
      return None
    except OSError:
      continue
  return ', '.join(h for h, _, _ in hosts[:3])


def prepare(builder, name: str) -> None:
  """download_and_prepare with clear errors for manual downloads and network failures
  (multi-worker runs: `chief_prepares`)."""
  if builder.is_prepared():
    return
  root = os.fspath(builder.data_dir_root)
  manual_dir = os.path.join(root, 'downloads', 'manual')
  pre_download = (f"On a machine with internet access run: python -c \"import tensorflow_datasets "
                  f"as tfds; tfds.builder('{name}', data_dir='DIR').download_and_prepare()\" and "
                  f"copy DIR to this machine, passing it as --data_dir (now {root}).")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (
      tf.io.gfile.isdir(manual_dir) and tf.io.gfile.listdir(manual_dir)):
    raise DatasetError(
        f'--dataset={name} needs a manual download: put the files in {manual_dir} (that is '
        f'<--data_dir>/downloads/manual) as TFDS describes below, then run again.\n'
        f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}')
  unreachable = _unreachable_download_hosts(builder)
  if unreachable:
    raise DatasetError(f'--dataset={name} must be downloaded, but {unreachable} cannot be reached '
                       '(no network?). ' + pre_download)
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    if _is_network_error(e):
      raise DatasetError(f'--dataset={name} could not be downloaded ({type(e).__name__}: {e}). '
                         + pre_download) from e
    raise DatasetError(f'--dataset={name} could not be prepared in {root} '
                       f'({type(e).__name__}: {e}). ' + pre_download) from e


def chief_prepares(exchange, timeout_s: float = CHIEF_PREPARE_WAIT_S) -> Callable:
  """A `prepare(builder, name) -> builder` for multi-worker runs: only the chief runs
  download_and_prepare (one writer in a shared data_dir, no race); the other workers wait for
  its result (`exchange`: distribute.ChiefExchange) and stop with its error if it failed.
  """

  def prepare_on_chief(builder, name: str):
    if not exchange.multi_worker:
      prepare(builder, name)
      return builder
    key = f'tfds_prepared/{name}'
    if exchange.chief:
      try:
        prepare(builder, name)
      except Exception as e:  # pylint: disable=broad-except
        exchange.publish(key, f'{type(e).__name__}: {e}')
        raise
      exchange.publish(key, _PREPARED)
      return builder
    root = os.fspath(builder.data_dir_root)
    log.info('Waiting (up to %.0f min) for the chief to prepare --dataset=%s in %s.',
             timeout_s / 60, name, root)
    outcome = exchange.wait(key, timeout_s, f'preparing --dataset={name} in {root}')
    if outcome != _PREPARED:
      raise DatasetError(f'The chief of this multi-worker run could not prepare --dataset={name} '
                         f'in {root}; stopping this worker too. The chief\'s error: {outcome}')
    if builder.is_prepared():
      return builder
    return tfds.builder(name, data_dir=root)  # Made before the data existed: read it afresh.

  return prepare_on_chief
