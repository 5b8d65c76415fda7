"""`peerdrive dashboard`: a local web page of one node (drives, files, peers, cache).

It sits beside the command line, above `vfs/`: it reads the node's home and
store and the mounts' extended attributes, and acts through the same
`vfs.flags` calls as `peerdrive pin|unpin|evict`. Nothing in `vfs/`, `dht/`
or `cache/` imports it.
"""
