import sys

from sparkops.cli.main import main

sys.exit(main())
