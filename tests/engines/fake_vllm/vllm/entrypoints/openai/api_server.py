"""A stand-in for vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`), for the fast tests of
`VllmEngine`: the same flags it is started with, the same bearer key, runtime LoRA loading and streamed
completions over token ids. It "generates" ` w0 w1 ...` (one word a token) and records each request body in
$FAKE_VLLM_RECORD, one JSON object a line, so tests can see what the engine sent."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--served-model-name")
    args, _ = ap.parse_known_args()
    key = os.environ["VLLM_API_KEY"]
    record = os.environ.get("FAKE_VLLM_RECORD")
    loras: dict[str, str] = {}
    app = FastAPI()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)

    @app.middleware("http")
    async def auth(request: Request, call_next: Any) -> Any:
        if request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {key}":
            return error(401, "bad key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": "0.0-fake"}

    @app.post("/v1/load_lora_adapter")
    async def load(body: dict[str, Any]) -> Any:
        if not (Path(body["lora_path"]) / "adapter_config.json").is_file():
            return error(400, f"no adapter at {body['lora_path']}")
        if body["lora_name"] in loras:
            return error(400, f"{body['lora_name']} already loaded")
        loras[body["lora_name"]] = body["lora_path"]
        return "ok"

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: dict[str, Any]) -> Any:
        return "ok" if loras.pop(body["lora_name"], None) else error(404, "not loaded")

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> Any:
        if record:
            with open(record, "a") as f:
                f.write(json.dumps(body) + "\n")
        if body["model"] != args.served_model_name and body["model"] not in loras:
            return error(404, f"model {body['model']} not found")
        if body.get("temperature", 1.0) < 0:
            return error(400, "temperature must be non-negative")

        def events() -> Any:
            n = body["max_tokens"]
            for i in range(n):
                choice = {"index": 0, "text": f" w{i}", "finish_reason": "length" if i == n - 1 else None}
                usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": i + 1}
                yield f"data: {json.dumps({'choices': [choice], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
