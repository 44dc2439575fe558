"""Human feedback collection: a web app where people compare, rank, rate, edit and write responses.

Pieces: :mod:`models` (tables) and :mod:`store` (every database query, Alembic migrations under
``migrations/``), :mod:`tasks` (the five task types and their forms), :mod:`app` (``create_app``)
and :mod:`routes` (FastAPI + Jinja2 pages), :mod:`analysis` (agreement, gold accuracy, model battles),
:mod:`export` (training-ready JSONL), :mod:`sampling` (``kilter sample``) and :mod:`cli`.
Nothing is imported here, so ``import kilter.feedback`` stays cheap and side-effect free.
"""
