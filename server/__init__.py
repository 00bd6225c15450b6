"""The SSOLE Hub embedding server: FastAPI routes, a dynamic batcher, settings and metrics.

Run it with ``python -m server --model MODEL``; build the app in code with
:func:`server.app.create_app`.
"""
