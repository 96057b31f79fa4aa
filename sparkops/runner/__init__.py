"""The one list of every job, the loop that schedules them, and `up`, which starts runner and app."""
