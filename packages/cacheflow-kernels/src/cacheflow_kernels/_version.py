"""Version numbers of cacheflow-kernels."""

__version__ = "0.3.0"

#: ABI version of the kernel library: bump on any breaking change of a function signature or a
#: tensor layout. The library reports its own (``abi_version``); a mismatch refuses to load.
ABI_VERSION = 5
