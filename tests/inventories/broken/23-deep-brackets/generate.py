"""Writes hosts.yaml whose one variable nests 100,000 brackets deep into the folder given."""

import sys
from pathlib import Path

depth = 100_000
text = "all:\n  hosts:\n    web1:\n      deep: " + "[" * depth + "]" * depth + "\n"
(Path(sys.argv[1]) / "hosts.yaml").write_text(text)
