"""A Flask app served by tests/integration/test_frameworks.py through a real master."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.get("/")
def home() -> str:
    return "flask home"


@app.get("/items/<int:number>")
def item(number: int) -> Any:
    return jsonify(number=number, query=request.args.get("q"), pid=os.getpid())


@app.post("/form")
def form() -> Any:
    return jsonify(dict(request.form))


@app.post("/json")
def echo_json() -> Any:
    return jsonify(got=request.get_json())


@app.post("/upload")
def upload() -> Any:
    files = {name: hashlib.sha256(f.read()).hexdigest() for name, f in request.files.items()}
    return jsonify(files=files, fields=dict(request.form))


@app.get("/stream")
def stream() -> Response:
    def lines() -> Iterator[str]:
        for number in range(5):
            yield f"line {number}\n"
    return Response(lines(), mimetype="text/plain")


@app.get("/boom")
def boom() -> str:
    raise RuntimeError("flask view failed on purpose")
