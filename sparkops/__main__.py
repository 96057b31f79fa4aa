import sys

from sparkops.cli.report import hand_off

# A worker's report under a live shim is handed to the shim before anything heavy
# is imported (see sparkops.cli.report); everything else is the full command line.
code = hand_off(sys.argv[1:])
if code is None:
    from sparkops.cli.main import main

    code = main()
sys.exit(code)
