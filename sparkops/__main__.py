import sys

# Two commands start without loading the command line and the database layer: a
# worker's report under a live shim, handed to the shim (sparkops.cli.report), and
# the demo agent. Everything else is the full command line.
argv = sys.argv[1:]
if argv[:1] == ["demo-agent"]:
    from sparkops.demo.agent import run_plain

    code = run_plain(argv[1:])
else:
    from sparkops.cli.report import hand_off

    code = hand_off(argv)
if code is None:
    from sparkops.cli.main import main

    code = main()
sys.exit(code)
