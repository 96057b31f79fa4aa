"""``python -m sparkops``: the command line for agents, scripts and operators.

Thin over the library: parse, call one library function, print. Library errors
become one line on stderr and an exit code: 0 ok, 1 not found or refused,
2 bad usage, bad configuration or an unusable database.
"""
