"""The console's ASGI app, mounted at `/console` of `tunelab serve` (and `/` redirects there): sign-in, the page
skeleton, static files, and the routers of the pages (jobs, data, models, playground, plan).

It is a sub-application on purpose: the API's app-wide bearer-key dependency does not apply here (pages use the
cookie session of `tunelab.console.session` instead), while it shares the API app's `state` (engine, settings,
jobs service), so a page calls exactly the service functions a route would, with the same owner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.routing import Route

from tunelab.console import session as sess
from tunelab.server.auth import principal_for_key
from tunelab.server.errors import install_error_handlers

HERE = Path(__file__).parent
STATIC = HERE / "static"
VENDOR = STATIC / "vendor"  # built by `make console-assets` (npm ci in assets/), ignored by git
CHART_JS = VENDOR / "uPlot.iife.min.js"
templates = Jinja2Templates(directory=str(HERE / "templates"))
PAGES = (("jobs", "Jobs"), ("data", "Data"), ("models", "Models"), ("playground", "Playground"), ("plan", "Plan"))


def page(request: Request, name: str, title: str, **ctx: Any) -> Response:
    """Render a page for a signed-in visitor; anyone else is sent to the sign-in form."""
    s = sess.current(request)
    if s.principal is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/console/login?next={quote(target)}", status_code=303)
    return _render(request, s, name, title, ctx)


def _render(request: Request, s: sess.Session, name: str, title: str, ctx: dict[str, Any],
            status: int = 200) -> Response:
    state = request.app.state
    context = {"request": request, "title": title, "csrf": s.csrf, "who": s.principal, "pages": PAGES,
               "keys": sess.needs_keys(request), "charts": CHART_JS.is_file(),
               "jobs_on": getattr(state, "jobs", None) is not None, **ctx}
    response = templates.TemplateResponse(request, name, context, status_code=status)
    if getattr(request.state, "new_session", None) is s:
        sess.set_cookie(request, response, s)
    return response


def not_found(request: Request, what: str) -> Response:
    s = sess.current(request)
    return _render(request, s, "error.html", "Not found", {"message": what}, status=404)


async def login_form(request: Request, next: str = "/console/jobs") -> Response:
    s = sess.current(request)
    if s.principal is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _render(request, s, "login.html", "Sign in", {"next": _safe_next(next), "error": None})


async def login(request: Request, key: str = Form(""), csrf: str = Form(""), next: str = Form("/console/jobs")
                ) -> Response:
    s = sess.current(request)
    sess.check_csrf(request, s, csrf)
    principal = principal_for_key(request.app.state.settings, key.strip()) if key.strip() else None
    if principal is None:
        return _render(request, s, "login.html", "Sign in", {"next": _safe_next(next),
                                                             "error": "unknown API key"}, status=401)
    sess.sessions(request).drop(s.id)  # a new id once signed in (no session fixation)
    fresh = sess.sessions(request).new(principal)
    response = RedirectResponse(_safe_next(next), status_code=303)
    sess.set_cookie(request, response, fresh)
    return response


async def logout(request: Request, csrf: str = Form("")) -> Response:
    s = sess.current(request)
    sess.check_csrf(request, s, csrf)
    sess.sessions(request).drop(s.id)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(sess.COOKIE, path="/console")
    return response


def _safe_next(target: str) -> str:
    # Only our own pages: an absolute or protocol-relative URL would make sign-in an open redirect.
    return target if target.startswith("/console/") and not target.startswith("//") else "/console/jobs"


def build_console(parent: FastAPI) -> FastAPI:
    from tunelab.console import data, jobs, models, plan, playground

    app = FastAPI(title="tunelab console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state = parent.state  # same engine, settings and services as the API routes
    parent.state.console_sessions = sess.Sessions()
    parent.state.console_pairs = {}  # open blind pairs of the playground
    install_error_handlers(app)
    app.add_api_route("/", lambda: RedirectResponse("/console/jobs", status_code=303), methods=["GET"])
    app.add_api_route("/login", login_form, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/login", login, methods=["POST"])
    app.add_api_route("/logout", logout, methods=["POST"])
    for module in (jobs, data, models, playground, plan):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=str(STATIC), check_dir=False), name="static")
    return app


def mount_console(app: FastAPI) -> None:
    """Serve the console at /console and send / there. `/` is a plain route, outside the API's key check."""
    app.mount("/console", build_console(app))
    app.router.routes.append(Route("/", lambda request: RedirectResponse("/console/", status_code=307)))
