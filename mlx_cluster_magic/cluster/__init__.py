"""The head's side, what a person drives from the notebook: ``MLXCluster`` and its life cycle
(``life_cycle``), what it shows (``displays``) and does besides running cells (``tools``), the
``%%px`` wait (``px``), the ``%mlx_cluster`` magic (``magics``: parsing only), the head's side of
``broadcast`` and ``sync``, and the pipeline plan (pure planning). Everything else in the
package sits below it and never imports it.
"""

from ..errors import MLXClusterError
from .life_cycle import EXIT_BAD_GROUP, HistoryEntry, MLXCluster, Placement

__all__ = ["EXIT_BAD_GROUP", "HistoryEntry", "MLXCluster", "MLXClusterError", "Placement"]
