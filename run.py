"""tf-simclr command line (in a clone); the installed `tf-simclr` command is the same program.

  python run.py --flagfile=flags/quickstart.cfg

The flags and the program are in tf_simclr_cli.py (beside the tf_simclr library, which never
reads absl flags).
"""

import tf_simclr_cli as cli
from tf_simclr_cli import *  # noqa: F401,F403  (run.FLAGS, run.config_from_flags, ... for tools)

if __name__ == '__main__':
  cli.run()
