"""Draw a `rapid bench serve` result's plots again from its serve.json or serve.json.gz (the device call deletes them: the device tool
returns a limited number of files). Usage: python bench/replot.py DIR_WITH_SERVE_JSON..."""

import sys
from pathlib import Path

from rapid.bench.report import write_plots
from result_files import read_json

if __name__ == "__main__":
    for d in sys.argv[1:]:
        summary = read_json(Path(d) / "serve.json")
        print(d, write_plots(summary, d))
