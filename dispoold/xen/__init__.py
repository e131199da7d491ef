"""The Xen backend (``[backend] name = "xen"``): libxl and xenstore through cffi.

``build`` compiles the bindings (``python -m dispoold.xen.build``), ``bindings`` loads
them or says why it cannot, ``libxl`` and ``xenstore`` are thin synchronous layers over
the two libraries, ``connection`` is the process's one connection to Xen (its contexts,
its xenstore watch and the reaper of libxl's children), ``options`` holds the settings,
and ``backend`` implements :class:`dispoold.backend.Backend` on top of them.
"""
