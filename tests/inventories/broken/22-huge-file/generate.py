"""Writes hosts.yaml, a syntactically valid inventory larger than mesh reads (65 MiB), into the folder given."""

import sys
from pathlib import Path

out = Path(sys.argv[1]) / "hosts.yaml"
line = "    padding-host-{:08d}: {{note: " + "x" * 80 + "}}\n"
with out.open("w") as handle:
    handle.write("all:\n  hosts:\n")
    written, n = 0, 0
    while written < 65 * 1024 * 1024:
        written += handle.write(line.format(n))
        n += 1
