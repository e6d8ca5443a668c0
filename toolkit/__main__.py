"""``python -m toolkit`` is the ``fedge`` command."""
import sys

from toolkit.cli.main import console

sys.exit(console())
