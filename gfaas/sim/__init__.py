"""A discrete-event simulator of a GPU cluster, driven by the live scheduling code."""
