"""Hugging Face Space entry point: the `clipcap app` page and `caption` API on a Hub model.

Settings come from the Space's variables (Settings -> Variables and secrets):
CLIPCAP_MODEL (the model id, default below), CLIPCAP_CLIP_MODEL (optional: a CLIP model id for
CLIPScore re-ranking), CLIPCAP_MAX_BATCH_SIZE and CLIPCAP_QUEUE_SIZE (default 8 and 64).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from modeling_clipcap.app import build_app, launch_app  # noqa: E402

MODEL = os.environ.get("CLIPCAP_MODEL", "org/clipcap-coco")
CLIP_MODEL = os.environ.get("CLIPCAP_CLIP_MODEL") or None

demo = build_app(
    MODEL,
    clip_model=CLIP_MODEL,
    max_batch_size=int(os.environ.get("CLIPCAP_MAX_BATCH_SIZE", "8")),
    queue_size=int(os.environ.get("CLIPCAP_QUEUE_SIZE", "64")),
)

if __name__ == "__main__":
    launch_app(demo)  # the Space sets GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
