"""peerdrive: dht layer."""
