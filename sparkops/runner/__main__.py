"""``python -m sparkops.runner``: the jobs runner (see :mod:`sparkops.runner.main`)."""

import sys

from sparkops.runner.main import main

sys.exit(main())
