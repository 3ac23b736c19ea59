"""The one exception users see: a one-line message that names the problem and the fix."""


class MLXClusterError(RuntimeError):
    """A problem with the cluster's input or its start; the message says how to fix it."""
