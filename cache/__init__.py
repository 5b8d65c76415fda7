"""peerdrive: cache layer."""
