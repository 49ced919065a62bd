"""`adactl` with a controller variant patched in first: cli.py VARIANT ARGS... ('' for none)."""

import sys

import variants

from adactl.cli import main

if sys.argv[1]:
    variants.apply(sys.argv[1])
sys.exit(main(sys.argv[2:]))
