import sys

from ..common.cli import run_cli
from .command import main

sys.exit(run_cli(main))
