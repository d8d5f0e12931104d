"""``python -m loradafast``: the ``loradafast`` command (:mod:`loradafast.cli`)."""
import sys

from .cli import main

sys.exit(main())
