"""The zero-copy data plane: pooled buffers, leases, bandwidth arbitration, backends.

Policy modules (allocator, leases, elastic, bandwidth) are pure: no I/O, no clock
reads, so the memory broker and the simulator run the same code. Backends (shm,
cuda) and the copier do the I/O. See docs/dataplane.md.
"""
