"""Three fastlb hooks people actually write (see the README, "Hooks").

Use them from a config such as:

    [hooks]
    module = "hooks"            # this file, on PYTHONPATH (or copy what you need into your own module)

    [[routes]]
    path = "/admin"
    backend = "app"
    hook = "hooks:header_auth"

    [[routes]]
    path = "/"
    backend = "stable"
    hook = "hooks:canary"

and `touch /run/fastlb-maintenance` to turn the maintenance page on (on_request runs on every route
that names no hook of its own).
"""

import hmac
import os

from fastlb.hooks import Response

# -- 1. header auth: an API key, compared in constant time, never passed on ------------------------------
API_KEYS = {k for k in os.environ.get("LB_API_KEYS", "").split(",") if k}


def header_auth(req):
    key = req.headers.get("X-Api-Key", "")
    if not any(hmac.compare_digest(key, good) for good in API_KEYS):
        return Response(401, b"missing or wrong X-Api-Key\n",
                        {"Content-Type": "text/plain", "WWW-Authenticate": 'ApiKey realm="api"'})
    req.remove_header("X-Api-Key")  # the backend never sees the secret
    req.set_header("X-Authenticated", "api-key")
    return None


# -- 2. canary by cookie: users who opted in go to the "canary" backend ----------------------------------
def canary(req):
    cookies = req.headers.get("Cookie", "")
    if any(part.strip() == "canary=1" for part in cookies.split(";")):
        req.backend = "canary"
        req.set_header("X-Canary", "1")


# -- 3. maintenance page: a file's presence turns it on, without a reload ---------------------------------
MAINTENANCE_FLAG = os.environ.get("LB_MAINTENANCE_FLAG", "/run/fastlb-maintenance")
MAINTENANCE_PAGE = b"<!doctype html><title>Maintenance</title><h1>Back in a few minutes</h1>\n"


def on_request(req):
    if os.path.exists(MAINTENANCE_FLAG) and req.path != "/healthz":
        return Response(503, MAINTENANCE_PAGE, {"Content-Type": "text/html; charset=utf-8",
                                                "Retry-After": "120"})
    return None


def on_response(req, resp):
    # Every answer says which backend served it: handy while a canary runs.
    resp.set_header("X-Served-By", req.backend)
