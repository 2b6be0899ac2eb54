"""OpenAI-compatible HTTP server over an `InferenceEngine`: schemas (protocol), auth, errors, a serving
layer and thin routes, assembled by `create_app(engine, settings)`. Never imports torch."""

from tunelab.server.app import create_app
from tunelab.server.auth import Principal, authenticate
from tunelab.server.errors import APIError
from tunelab.server.settings import ServerSettings, load_admin_keys, load_api_keys

__all__ = ["APIError", "Principal", "ServerSettings", "authenticate", "create_app", "load_admin_keys",
           "load_api_keys"]
