"""Where the control plane listens by default: the controller binds it (``controller.config``),
the client dials it (``hpt.client``). A leaf: imports nothing, so both sides can import it."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7470
"""The control plane's default port on loopback; ``HPT_CONTROLLER`` or ``--controller`` override."""
