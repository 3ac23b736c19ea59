"""Views of plain data: the live status widget, its text/HTML fallbacks, charts, gather results.

Each module renders data it is given (a ``ClusterSnapshot``, a gather result) and acts only
through callbacks, so nothing here imports the cluster. This package file stays empty of imports
so that the light modules (``charts``, ``gather_view``, ``text``) load without anywidget or IPython.
"""
