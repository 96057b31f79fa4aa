"""Work on the board: dispatch into worker shims, the shims themselves, reclaim, the live workers."""
