"""`python run.py ...` from a clone: the tf-simclr command line (tf_simclr/cli/)."""
from tf_simclr.cli import run
if __name__ == '__main__': run()
