"""``python -m loradafast.cli``: the ``loradafast`` command, as ``python -m loradafast``."""
import sys

from . import main

sys.exit(main())
