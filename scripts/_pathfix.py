"""Let `import llamaforge` find this checkout's src/ first.

Snakemake declares each rule's script and library module as inputs; importing the library from
the same checkout makes that true, also inside --sdm conda environments where the package is not
installed. Every script imports this module first.
"""

import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parent.parent / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)
