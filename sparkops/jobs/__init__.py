"""The job framework (context, report, lock, one recorded run) and the host registry; it imports no job."""
