import sys

from sparkops.cli import main

sys.exit(main())
