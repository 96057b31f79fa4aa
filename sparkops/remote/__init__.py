"""Other hosts over SSH: verified connections, the push, the tunnel, remote GPUs."""
