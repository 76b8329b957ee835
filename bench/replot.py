"""Draw a `rapid bench serve` result's plots again from its serve.json (the device call deletes them: the device tool
returns a limited number of files). Usage: python bench/replot.py DIR_WITH_SERVE_JSON..."""

import json
import sys
from pathlib import Path

from rapid.bench.report import write_plots

if __name__ == "__main__":
    for d in sys.argv[1:]:
        summary = json.loads((Path(d) / "serve.json").read_text())
        print(d, write_plots(summary, d))
