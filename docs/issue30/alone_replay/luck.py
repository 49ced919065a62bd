"""`docs/issue30/sampling_luck.py` (the engine) with a variant patched in first: luck.py VARIANT ARGS..."""

import runpy
import sys
from pathlib import Path

import variants

if sys.argv[1]:
    variants.apply(sys.argv[1])
sys.argv = [sys.argv[0], *sys.argv[2:]]
runpy.run_path(str(Path(__file__).parents[1] / "sampling_luck.py"), run_name="__main__")
