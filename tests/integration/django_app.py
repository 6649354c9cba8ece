"""A Django project in one module, served by tests/integration/test_frameworks.py through a real master."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterator

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="only-for-the-tests",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    USE_TZ=True,
    # The traceback of a failing view goes to stderr: the master's error log.
    LOGGING={"version": 1, "disable_existing_loggers": False,
             "handlers": {"stderr": {"class": "logging.StreamHandler"}},
             "loggers": {"django.request": {"handlers": ["stderr"], "level": "ERROR"}}},
)

import django  # noqa: E402 - after settings, as a one-module project must
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse  # noqa: E402
from django.urls import path  # noqa: E402

django.setup()


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponse("django home")


def item(request: HttpRequest, number: int) -> JsonResponse:
    return JsonResponse({"number": number, "query": request.GET.get("q"), "pid": os.getpid()})


def form(request: HttpRequest) -> JsonResponse:
    return JsonResponse(request.POST.dict())


def echo_json(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"got": json.loads(request.body)})


def upload(request: HttpRequest) -> JsonResponse:
    files = {name: hashlib.sha256(f.read()).hexdigest() for name, f in request.FILES.items()}
    return JsonResponse({"files": files, "fields": request.POST.dict()})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def lines() -> Iterator[str]:
        for number in range(5):
            yield f"line {number}\n"
    return StreamingHttpResponse(lines(), content_type="text/plain")


def boom(request: HttpRequest) -> Any:
    raise RuntimeError("django view failed on purpose")


urlpatterns = [
    path("", home), path("items/<int:number>", item), path("form", form), path("json", echo_json),
    path("upload", upload), path("stream", stream), path("boom", boom),
]

app = get_wsgi_application()
