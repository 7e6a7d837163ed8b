"""Drives a Fractal gateway with the unmodified openai SDK.

usage: e2e.py BASE_URL API_KEY OUT_MP4
Prints one JSON line with what it saw; exits non-zero on any surprise.
"""
import json
import sys
import warnings

import openai

warnings.simplefilter("ignore", DeprecationWarning)
base, key, out = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

models = [m.to_dict() for m in client.models.list()]
assert [m["id"] for m in models] == ["fractal-tiny-v1"], models
first = models[0]
assert first["object"] == "model" and first["owned_by"] == "fractal", first
assert first["state"] == "active" and "32x32" in first["sizes"], first
assert client.models.retrieve(first["manifest_id"]).id == first["id"]

video = client.videos.create_and_poll(
    model=first["id"],
    prompt="a lighthouse at dusk, waves crashing on rocks",
    size="32x32",
    seconds="0.5",
    extra_body={"steps": 4, "seed": 1234, "negative_prompt": "blurry"},
    poll_interval_ms=200,
)
assert video.status == "completed", video
assert video.progress == 100, video
assert video.model == first["id"], video
client.videos.download_content(video.id, variant="video").write_to_file(out)
gif = client.videos.download_content(video.id, variant="gif").read()
assert gif[:6] in (b"GIF87a", b"GIF89a"), gif[:6]
thumb = client.videos.download_content(video.id, variant="thumbnail").read()
assert thumb[:8] == b"\x89PNG\r\n\x1a\n", thumb[:8]

again = client.videos.retrieve(video.id)
assert again.id == video.id and again.status == "completed"
listed = [v.id for v in client.videos.list(limit=10)]
assert video.id in listed, listed

plain = client.videos.create(prompt="a cat playing piano", size="32x32", seconds="0.5", extra_body={"steps": 2})
assert plain.status in ("queued", "in_progress"), plain
deleted = client.videos.delete(plain.id)
assert deleted.deleted and deleted.id == plain.id, deleted

errors = {}
try:
    client.videos.create(prompt="x", size="720x1280")
except openai.BadRequestError as e:
    errors["bad_size"] = e.body["code"]
try:
    client.videos.create(prompt="x", model="sora-2")
except openai.BadRequestError as e:
    errors["unknown_model"] = e.body["code"]
try:
    client.videos.retrieve("video_does_not_exist")
except openai.NotFoundError as e:
    errors["unknown_id"] = e.body["code"]
try:
    openai.OpenAI(base_url=base + "/v1", api_key="fk-wrong", max_retries=0).videos.list()
except openai.AuthenticationError as e:
    errors["bad_key"] = e.body["code"]
assert errors == {"bad_size": "invalid_value", "unknown_model": "model_not_found", "unknown_id": "not_found", "bad_key": "invalid_api_key"}, errors

print(json.dumps({"id": video.id, "seconds": video.seconds, "size": video.size, "models": [m["id"] for m in models], "errors": errors}))
