"""Watching the box: services, vLLM, the GPU, disks, and the alerts they raise."""
