"""Links to other machines: SSH logins with verified host keys (paramiko), below the
meters so that a run's shim can read a GPU on another box."""
