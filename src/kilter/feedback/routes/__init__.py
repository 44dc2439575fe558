"""The web app's routers, one module per area; ``kilter.feedback.app.create_app`` includes them.

:mod:`deps` holds what every view needs (the store, settings and templates read from
``request.app.state``, the session user, the CSRF-checked form); :mod:`auth` is login, logout and
invite links, :mod:`annotate` the annotator pages, :mod:`admin` the admin pages.
"""
