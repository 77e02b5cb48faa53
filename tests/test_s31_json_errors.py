"""Every client mistake is answered in the JSON error shape, outside /v1 too (BentoML's own routes)."""

import pytest


@pytest.mark.parametrize("method, path, status, code, allow", [
    ("GET", "/nope", 404, "not_found", None),
    ("POST", "/readyz", 405, "method_not_allowed", "GET"),
    ("DELETE", "/livez", 405, "method_not_allowed", "GET"),
    ("GET", "/a%01b", 404, "not_found", None),
])
def test_a_wrong_path_or_method_outside_v1_gets_json(service_app, method, path, status, code, allow):
    """Before: 404 `Not Found` and 405 `Method Not Allowed` in text/plain (a client reading `error.code` got a
    JSONDecodeError)."""
    client, _ = service_app
    r = client.request(method, path)
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code and path.split("%")[0] in error["message"]
    assert "\x01" not in error["message"]
    if allow:
        assert allow in r.headers["allow"] and allow in error["message"]


def test_json_answers_and_successes_pass_unchanged(service_app):
    client, _ = service_app
    inside = client.get("/v1/nope")
    assert inside.status_code == 404 and inside.json() == {
        "error": {"code": "not_found", "message": "no endpoint /v1/nope; see /v1/docs"}}
    assert client.get("/livez").status_code == 200
    assert client.get("/v1/model").json()["labels"]
    assert client.head("/nope").status_code == 404  # no body to rewrite

