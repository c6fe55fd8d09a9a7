"""Shared pytest configuration: the repository root on sys.path for ``tools/`` imports; OpenMP wait policy."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# OpenMP threads that spin while idle make torch 3-20x slower on a shared 2-core machine (measured on the LLM's
# decode); set before anything imports torch. The Makefile exports the same for notebooks and benchmarks.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
