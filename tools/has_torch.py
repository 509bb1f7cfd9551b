"""Exit 0 when a torch >= 2.8 is importable, so the Makefile leaves it alone; 1 otherwise."""
import sys

try:
    import torch
except ImportError:
    sys.exit(1)
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 8) else 1)
