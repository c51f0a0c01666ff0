"""``python -m exporter.cli``: the same entry point as the ``glm-export`` script."""
import sys

from exporter.cli import main

sys.exit(main(prog_name="glm-export"))
