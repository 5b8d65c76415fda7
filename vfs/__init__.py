"""peerdrive: vfs layer."""
