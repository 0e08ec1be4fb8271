"""`corral ui`: the web dashboard over an audit store, and its Prometheus metrics (/metrics).

serve(listen="127.0.0.1:8765", store=None, token=None)   run it (what the CLI calls)
make_app(store, token=...)                                 the ASGI app, for tests or another server
measure_pages(store)                                       median render times, for the benchmark
"""

from corral.ui._guard import ListenError
from corral.ui._measure import measure_pages
from corral.ui.app import make_app, serve

__all__ = ["ListenError", "make_app", "measure_pages", "serve"]
