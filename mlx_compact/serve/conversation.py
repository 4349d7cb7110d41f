"""OpenAI chat messages -> the segments a conversation is computed in.

A conversation is fed to the model one *segment* at a time: segment k is everything the chat template adds
from the end of user turn k - 1's generation prompt (``<|im_start|>assistant\\n``) to the end of user turn
k's, that is the previous answer and the next question, with the images of that question. Every request is
computed segment by segment, from an empty cache or from a stored state (`prefix.PrefixCache`) that holds
its first segments: the same computations in the same order, so a reused prefix gives exactly the tokens
a fresh run gives. A segment's key chains the keys before it, its text and its images' content hashes.

Images: ``data:`` URIs (base64, any format Pillow reads), and local paths or ``file://`` URLs inside the
server's media folder only. Nothing is fetched from the network.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..files import InputError, inside, read_bytes
from ..generate import check_prompt
from ..images import ImageFile, open_image

IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class Image:
    """An image of a request: its file (header read, decoded after the plan) and its content hash."""

    file: ImageFile
    sha256: str


@dataclass
class Message:
    role: str  # system, user or assistant
    parts: list  # str (text) or Image, in order

    @property
    def text(self) -> str:
        return "\n".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list[Image]:
        return [p for p in self.parts if isinstance(p, Image)]


@dataclass
class Segment:
    text: str  # what the model reads, chat template applied, one IMAGE_TEXT per image
    images: list[Image]
    question: str  # the user text of its turn (what prompt-aware compaction reads)
    key: str = ""  # hash of every segment up to this one, and the settings


@dataclass
class Limits:
    max_images: int = 8
    max_messages: int = 512
    max_image_pixels: int = 50_000_000
    max_image_bytes: int = 64 << 20


def _fail(message: str, param: str = "messages") -> InputError:
    e = InputError(message)
    e.param = param
    return e


def load_image(url: str, where: str, folder: str, media_dir: str | None, limits: Limits, n: int) -> Image:
    """The image an ``image_url`` names, checked from its header; ``data:`` URIs are written to ``folder``."""
    if not isinstance(url, str) or not url:
        raise _fail(f"{where}: image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        head, sep, payload = url.partition(",")
        if not sep or not head.lower().endswith(";base64"):
            raise _fail(f"{where}: a data URI image must be base64 (data:image/png;base64,...)")
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise _fail(f"{where}: the data URI is not valid base64") from None
        if not data:
            raise _fail(f"{where}: the data URI holds no image")
        path = os.path.join(folder, f"image-{n}")
        with open(path, "wb") as f:
            f.write(data)
        label = f"{where} (data URI)"
    elif scheme in ("http", "https", "ftp"):
        raise _fail(
            f"{where}: remote image URLs are not fetched (this server never reaches the network); "
            "send the image as a data: URI (base64) or, with --media-dir, a file path"
        )
    elif scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        if media_dir is None:
            raise _fail(
                f"{where}: local image paths are refused: start the server with --media-dir DIR to allow files in DIR"
            )
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if scheme == "file" else url
        path = os.path.join(media_dir, path)
        if not inside(path, media_dir):
            raise _fail(f"{where}: {url} is outside the server's media folder (--media-dir); refusing to read it")
        try:
            data = read_bytes(path, what="image", limit=limits.max_image_bytes)
        except FileNotFoundError:
            raise _fail(f"{where}: image not found: {url}") from None
        except InputError as e:
            raise _fail(f"{where}: {e}".replace(os.path.realpath(media_dir), "<media-dir>")) from None
        label = f"{where} ({url})"
    else:
        raise _fail(f"{where}: image URL scheme {scheme!r} is not supported; send a data: URI (base64)")
    if len(data) > limits.max_image_bytes:
        raise _fail(f"{where}: the image is {len(data)} bytes, more than this server takes ({limits.max_image_bytes})")
    try:
        im = open_image(path)
    except InputError as e:
        raise _fail(str(e).replace(str(path), label)) from None
    if im.height * im.width > limits.max_image_pixels:
        raise _fail(
            f"{where}: the image is {im.width}x{im.height} pixels, more than the {limits.max_image_pixels} this "
            "server takes (--max-image-pixels); send a smaller image"
        )
    return Image(im, hashlib.sha256(data).hexdigest())


def parse_messages(processor, messages, folder: str, media_dir: str | None, limits: Limits) -> list[Message]:
    """OpenAI chat ``messages`` -> `Message`s, images loaded (see `load_image`), texts checked."""
    if not isinstance(messages, list) or not messages:
        raise _fail("messages must be a non-empty list of {role, content} objects")
    if len(messages) > limits.max_messages:
        raise _fail(
            f"the request has {len(messages)} messages, more than this server takes ({limits.max_messages}, --max-messages)"
        )
    out, n_images = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _fail(f"{where} must be an object with role and content")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise _fail(f"{where}.role must be system, developer, user or assistant, got {str(m.get('role'))[:40]!r}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise _fail(f"{where}.content must be a string or a list of content parts")
        msg = Message(role, [])
        for j, part in enumerate(parts):
            pw = f"{where}.content[{j}]"
            if isinstance(part, str):
                msg.parts.append(part)
                continue
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                msg.parts.append(part["text"])
            elif kind == "image_url" and role == "user":
                n_images += 1
                if n_images > limits.max_images:
                    raise _fail(f"the request has more than {limits.max_images} images (--max-images)")
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                msg.parts.append(load_image(url, pw, folder, media_dir, limits, n_images))
            elif kind == "image_url":
                raise _fail(f"{pw}: only user messages may hold images")
            else:
                raise _fail(f"{pw}: a content part is {{type: text, text}} or {{type: image_url, image_url: {{url}}}}")
        for text in msg.parts:
            if isinstance(text, str):
                try:
                    check_prompt(processor, text)
                except InputError as e:
                    raise _fail(f"{where}: {e}") from None
        out.append(msg)
    if out[-1].role != "user":
        raise _fail("the last message must be the user's (the server answers it)")
    return out


def _template(m: Message) -> dict:
    if m.role != "user":
        return {"role": m.role, "content": m.text}
    return {
        "role": "user",
        "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in m.parts],
    }


def segments(processor, messages: list[Message], settings: str) -> list[Segment]:
    """The conversation's segments (see the module docstring), keys chained from ``settings``."""
    rendered = [_template(m) for m in messages]
    ends = [
        i
        for i, m in enumerate(messages)
        if m.role == "user" and (i + 1 == len(messages) or messages[i + 1].role == "assistant")
    ]
    out, done, start = [], "", 0
    for end in ends:
        text = processor.apply_chat_template(rendered[: end + 1], add_generation_prompt=True)
        if not text.startswith(done):  # the template re-renders earlier turns: one segment from the start
            out, done, start = [], "", 0
        turn = messages[start : end + 1]
        seg = Segment(text[len(done) :], [im for m in turn for im in m.images], messages[end].text)
        if seg.text.count(IMAGE_TEXT) != len(seg.images):
            raise _fail("the model's chat template does not place every image of the conversation")
        out.append(seg)
        done, start = text, end + 1
    key = hashlib.sha256(settings.encode()).hexdigest()
    for seg in out:
        h = hashlib.sha256(key.encode())
        h.update(seg.text.encode("utf-8", "surrogatepass"))
        for im in seg.images:
            h.update(b"\0" + im.sha256.encode())
        seg.key = key = h.hexdigest()
    return out


def media_folder(path: str | None) -> str | None:
    """The media folder, resolved, checked to be a directory."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"--media-dir {path} is not a folder")
    return os.path.realpath(p)
