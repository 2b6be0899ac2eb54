"""OpenAI's Files and Fine-tuning Jobs APIs, self-hosted on `tunelab serve` (on by default).

  store.py    durable state (SQLAlchemy: SQLite by default, any SQLAlchemy URL such as PostgreSQL)
  hyper.py    request -> RunConfig: "auto" hyperparameters (OpenAI's rules) and tunelab's own options
  service.py  the API's behaviour over the store (objects, ownership, pagination, state changes)
  workers.py  validation and training in child processes, cancel/pause, restart recovery
  harvest.py  what a child writes -> events, checkpoint metrics, the result CSV (pure functions)
  child.py    the child process entry (`python -m tunelab.jobs.child`): the only place torch is imported
  routes.py   thin FastAPI routers; app.py builds the served app; cli.py the commands.

Nothing here except child.py (run in its own process) imports torch (the server's engine is built by `tunelab serve`, tunelab/engine/cli.py).
"""
