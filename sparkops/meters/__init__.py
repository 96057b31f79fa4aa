"""The host's meters, read without side effects: the GPUs through NVML (and NVML's one
fake), vLLM's Prometheus counters, one sample of them all, and each run's share of
their increase (kept in the ops database by the ledger)."""
