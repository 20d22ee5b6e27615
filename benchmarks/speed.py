"""Kept for old commands: the speed benchmark is ``qkvtune bench speed`` (qkvtune/bench/speed.py)."""
import sys

from qkvtune.cli import main

sys.exit(main(["bench", "speed", *sys.argv[1:]]))
