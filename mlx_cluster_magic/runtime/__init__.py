"""What a kept cluster's runtime and the notebooks attached to it share: where its record lives
(``records``) and the signed channel they talk over (``channel``). Neither owns a process: the
runtime process itself is ``cluster.runtime_server``, the client side ``cluster.attached``."""
