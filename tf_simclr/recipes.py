"""The command line's recipes (`flags/*.cfg`) from Python: their names and flags
(`tf_simclr.SimCLR.recipe_arguments` picks the model's). The flagfiles are the one source:
`tf_simclr/flags` is a link to the clone's `flags/`, installed with the package (pyproject
package-data), so `pip install` users have them too."""

from __future__ import annotations

import pathlib
import re
from typing import Dict, List

RECIPES_DIR = pathlib.Path(__file__).resolve().parent / 'flags'
_LINE = re.compile(r'--([a-z0-9_]+)=(.*)')


def names() -> List[str]:
  """The recipe names (`quickstart`, `cifar10_simclrv2`, ...)."""
  return sorted(p.stem for p in RECIPES_DIR.glob('*.cfg'))


def path(name: str) -> pathlib.Path:
  """The flagfile of recipe `name` (for `tf-simclr --flagfile=...`)."""
  found = RECIPES_DIR / f'{name}.cfg'
  if not found.is_file():
    raise ValueError(f'No recipe {name!r}; available: {", ".join(names())}.')
  return found


def _value(text: str):
  """A flag's text as a Python value (bool, int, float, else the string)."""
  if text in ('True', 'true', 'False', 'false'):
    return text.lower() == 'true'
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def flags(name: str) -> Dict[str, object]:
  """{flag: value} of the recipe's `--name=value` lines (comments skipped)."""
  out = {}
  for line in path(name).read_text().splitlines():
    match = _LINE.fullmatch(line.strip())
    if match:
      out[match.group(1)] = _value(match.group(2))
  return out
