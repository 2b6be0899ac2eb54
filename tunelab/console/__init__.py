"""The web console at `/` of `tunelab serve` (served under /console): Jobs, Data, Models, Playground and Plan
pages over the same service functions as the API (`tunelab.jobs.service`, `tunelab.registry`, `tunelab.plan`,
`tunelab.data.validate`, `tunelab.eval.judge`), signed in with an API key when the server has keys.

Server-rendered Jinja2 pages with a little vanilla JS (static/console.js); the one chart library (uPlot) comes
from npm at build time (`make console-assets` -> static/vendor/, ignored by git). See docs/console.md.
"""

from tunelab.console.app import mount_console

__all__ = ["mount_console"]
