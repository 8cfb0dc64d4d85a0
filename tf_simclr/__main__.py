"""`python -m tf_simclr ...`: the command line (the same program as `tf-simclr` and run.py)."""

from tf_simclr.cli import run

if __name__ == '__main__':
  run()
